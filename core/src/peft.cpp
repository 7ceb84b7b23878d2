// PEFT adapter files (see peft.h).
#include "qtune/peft.h"

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "qtune/atomic_file.h"
#include "qtune/run_identity.h"
#include "qtune/error.h"
#include "qtune/files.h"
#include "qtune/safetensors.h"

namespace fs = std::filesystem;

namespace qtune {

namespace {
// PeftModel wraps the transformers model as base_model (a LoraModel) whose .model is the
// LlamaForCausalLM: hence the doubled prefix in front of HF's own "model.layers...".
const std::string kPrefix = "base_model.model.";
const char* kConfigFile = "adapter_config.json";
const char* kWeightsFile = "adapter_model.safetensors";

std::string short_name_of(const std::string& slot_path) {
  // "model.layers.3.self_attn.q_proj" -> "q"; "lm_head" -> "output"
  if (slot_path == "lm_head") return "output";
  auto name = slot_path.substr(slot_path.rfind('.') + 1);
  return name.substr(0, name.size() - 5);
}

}  // namespace

std::string peft_module_name(const std::string& short_name) {
  return short_name == "output" ? "lm_head" : short_name + "_proj";
}

std::vector<std::pair<std::string, torch::Tensor>> peft_adapter_tensors(
    const LlamaForCausalLMImpl& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& [path, slot] : model.slots()) {
    if (!slot->adapter()) continue;
    for (const auto& [key, t] : slot->adapter()->state().tensors)
      out.emplace_back(kPrefix + path + "." + key, t);
  }
  return out;
}

void save_peft_adapter(const std::string& dir, const LlamaForCausalLMImpl& model,
                       const std::string& base_model, const Json& qtune_info) {
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [key, t] : peft_adapter_tensors(model))
    tensors[key] = t.detach().to(torch::kCPU);
  QTUNE_CHECK(!tensors.empty(), "the model has no adapter to save (train_type full?)");
  Json config;
  std::set<std::string> targets;
  for (const auto& [path, slot] : model.slots()) {
    if (!slot->adapter()) continue;
    if (config.is_null()) config = slot->adapter()->peft_config();
    targets.insert(peft_module_name(short_name_of(path)));
  }
  config["target_modules"] = std::vector<std::string>(targets.begin(), targets.end());
  config["base_model_name_or_path"] = base_model;
  config["task_type"] = "CAUSAL_LM";
  config["inference_mode"] = true;
  config["modules_to_save"] = nullptr;
  std::error_code ec;
  fs::create_directories(dir, ec);
  QTUNE_CHECK(!ec, "cannot create adapter directory ", dir, ": ", ec.message());
  std::map<std::string, std::string> meta{{"format", "pt"}};
  if (!qtune_info.is_null()) meta["qtune"] = qtune_info.dump();
  write_safetensors((fs::path(dir) / kWeightsFile).string(), tensors, meta);
  atomic_write_string((fs::path(dir) / kConfigFile).string(), config.dump(2) + "\n");
}

Json read_peft_config(const std::string& dir) {
  const auto file = (fs::path(dir) / kConfigFile).string();
  QTUNE_CHECK(fs::exists(file), "not a PEFT adapter directory: ", file, " is missing");
  const Json j = read_json_file(file);
  QTUNE_CHECK(j.is_object() && j.contains("peft_type") && j["peft_type"].is_string(), file,
              ": expected a JSON object with a string \"peft_type\"");
  return j;
}

Json read_peft_qtune_info(const std::string& dir) {
  const auto file = (fs::path(dir) / kWeightsFile).string();
  QTUNE_CHECK(fs::exists(file), "adapter not found: ", file);
  auto st = SafetensorsFile::open(file);
  auto it = st->metadata().find("qtune");
  if (it == st->metadata().end()) return nullptr;
  try {
    Json j = Json::parse(it->second);
    QTUNE_CHECK(j.is_object(), file, ": __metadata__.qtune must be a JSON object");
    return j;
  } catch (const Json::exception& e) {
    throw UserError(file + ": __metadata__.qtune is not valid JSON (" + e.what() + ")");
  }
}

namespace {

// adapter_config.json must describe the adapter it sits beside: its rank against the tensors'
// (lora_A is [r, in]), and for a qtune adapter rank, alpha, rsLoRA and target modules against what
// qtune recorded; its kind (peft_type, use_dora) against the adapter loading it. A difference is
// refused, never ignored.
void check_config_agrees(const Json& config, const std::string& file, const SafetensorsFile& st,
                         const Json& identity, const LlamaForCausalLMImpl& model) {
  auto differs = [&](const char* key, const Json& other, const std::string& source) {
    const Json& a = config[key];
    const bool same = a.is_number() && other.is_number() ? a.get<double>() == other.get<double>()
                                                         : a == other;
    QTUNE_CHECK(same, file, ": ", key, " is ", a.dump(), ", but ", source, " says ", other.dump(),
                "; the config does not describe this adapter");
  };
  auto has = [&](const char* key) { return config.contains(key) && !config[key].is_null(); };
  // Kind: the adapter plugin that loads it writes these itself.
  Json own;
  for (const auto& [path, slot] : model.slots())
    if (slot->adapter()) {
      own = slot->adapter()->peft_config();
      break;
    }
  for (const char* key : {"peft_type", "use_dora"})
    if (has(key) && own.contains(key)) differs(key, own[key], "the adapter loading it");
  // Rank: every lora_A tensor, and the modules they sit on.
  const std::string suffix = ".lora_A.weight";
  std::set<std::string> modules;
  for (const auto& name : st.names()) {
    if (name.size() <= suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    const std::string module = name.substr(0, name.size() - suffix.size());
    modules.insert(module.substr(module.rfind('.') + 1));
    const auto& shape = st.info(name).shape;
    if (has("r") && !shape.empty() && !(config.contains("rank_pattern") && !config["rank_pattern"].empty()))
      differs("r", Json(shape[0]), "tensor " + name + " of " + st.path());
  }
  if (!identity.is_object()) return;  // an adapter of another tool: its config is all there is
  const Json recorded = identity.value("adapter_options", Json());
  const std::string source = "what qtune recorded in " + st.path();
  if (recorded.is_object()) {
    if (has("r") && recorded.contains("rank")) differs("r", recorded["rank"], source);
    if (has("lora_alpha") && recorded.contains("alpha")) differs("lora_alpha", recorded["alpha"], source);
    if (has("use_rslora") && recorded.contains("use_rslora"))
      differs("use_rslora", recorded["use_rslora"], source);
  }
  if (config.contains("target_modules") && config["target_modules"].is_array()) {
    std::set<std::string> listed;
    for (const auto& m : config["target_modules"])
      listed.insert(m.is_string() ? m.get<std::string>() : m.dump());
    auto join = [](const std::set<std::string>& set) {
      std::string out;
      for (const auto& x : set) out += (out.empty() ? "" : ", ") + x;
      return out.empty() ? std::string("none") : out;
    };
    QTUNE_CHECK(listed == modules, file, ": target_modules [", join(listed), "], but the tensors of ",
                st.path(), " are on [", join(modules), "]; the config does not describe this adapter");
  }
}

}  // namespace

void load_peft_adapter(const std::string& dir, LlamaForCausalLMImpl& model,
                       const Json& base_identity) {
  const auto file = (fs::path(dir) / kWeightsFile).string();
  QTUNE_CHECK(fs::exists(file), "adapter not found: ", file);
  const Json config = read_peft_config(dir);
  const Json info = read_peft_qtune_info(dir);
  const Json identity = info.is_object() ? info.value("identity", Json()) : Json();

  // A different base is refused before any shape is compared: the shapes may well agree (two
  // fine-tunes of one architecture) while the adapter would be meaningless on the other one.
  if (!base_identity.is_null() && identity.is_object() && identity.contains("base"))
    check_base_identity(identity["base"], base_identity, "adapter " + dir);

  // The options the adapter was trained with, for the plugin's own checks of what shapes cannot
  // show (alpha, rslora). qtune adapters record the plugin's option names; PEFT LoRA configs are
  // translated where the plugin uses the same meaning.
  Json options;
  if (identity.is_object() && identity.value("adapter_options", Json()).is_object()) {
    options = identity["adapter_options"];
  } else if (config["peft_type"] == "LORA") {
    options = Json::object();
    if (config.contains("lora_alpha") && config["lora_alpha"].is_number())
      options["alpha"] = config["lora_alpha"];
    if (config.contains("use_rslora") && config["use_rslora"].is_boolean())
      options["use_rslora"] = config["use_rslora"];
  }

  auto st = SafetensorsFile::open(file);
  check_config_agrees(config, (fs::path(dir) / kConfigFile).string(), *st, identity, model);

  std::set<std::string> used;
  bool any = false;
  for (const auto& [path, slot] : model.slots()) {
    if (!slot->adapter()) continue;
    any = true;
    TensorState state = slot->adapter()->state();
    TensorState incoming;
    incoming.meta = state.meta;
    if (options.is_object() && incoming.meta.contains("options"))
      for (const auto& [k, v] : options.items())
        if (incoming.meta["options"].contains(k)) incoming.meta["options"][k] = v;
    for (const auto& [key, want] : state.tensors) {
      const std::string name = kPrefix + path + "." + key;
      QTUNE_CHECK(st->has(name), file, ": missing tensor ", name,
                  " (the adapter was trained with other target modules?)");
      auto t = st->tensor(name);
      QTUNE_CHECK(t.sizes() == want.sizes(), file, ": tensor ", name, " has shape ",
                  shape_str(t.sizes()), " but this model needs ", shape_str(want.sizes()),
                  " (the adapter was trained on a different base model or with another rank)");
      incoming.tensors[key] = t;
      used.insert(name);
    }
    try {
      slot->adapter()->load(incoming);
    } catch (const UserError& e) {
      throw UserError(file + ": " + path + ": " + e.what());
    }
  }
  QTUNE_CHECK(any, "cannot load adapter ", dir, ": the model has no adapter slots");
  for (const auto& name : st->names())
    QTUNE_CHECK(used.count(name), file, ": tensor ", name,
                " has no adapter slot in this model (different target modules?)");
}

}  // namespace qtune
