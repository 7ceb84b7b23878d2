// PEFT adapter files (see peft.h).
#include "qtune/peft.h"

#include <filesystem>
#include <fstream>

#include "qtune/atomic_file.h"
#include "qtune/error.h"
#include "qtune/safetensors.h"

namespace fs = std::filesystem;

namespace qtune {

namespace {
const std::string kPrefix = "base_model.model.";

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

void save_peft_adapter(const std::string& dir, const LlamaForCausalLMImpl& model,
                       const std::string& base_model) {
  std::map<std::string, torch::Tensor> tensors;
  Json config;
  std::set<std::string> targets;
  for (const auto& [path, slot] : model.slots()) {
    if (!slot->adapter()) continue;
    for (const auto& [key, t] : slot->adapter()->state().tensors)
      tensors[kPrefix + path + "." + key] = t.detach().to(torch::kCPU);
    if (config.is_null()) config = slot->adapter()->peft_config();
    targets.insert(peft_module_name(short_name_of(path)));
  }
  QTUNE_CHECK(!tensors.empty(), "the model has no adapter to save (train_type full?)");
  config["target_modules"] = std::vector<std::string>(targets.begin(), targets.end());
  config["base_model_name_or_path"] = base_model;
  config["task_type"] = "CAUSAL_LM";
  config["inference_mode"] = true;
  config["modules_to_save"] = nullptr;
  std::error_code ec;
  fs::create_directories(dir, ec);
  QTUNE_CHECK(!ec, "cannot create adapter directory ", dir, ": ", ec.message());
  write_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), tensors,
                    {{"format", "pt"}});
  atomic_write_string((fs::path(dir) / "adapter_config.json").string(), config.dump(2) + "\n");
}

void load_peft_adapter(const std::string& dir, LlamaForCausalLMImpl& model) {
  const auto file = (fs::path(dir) / "adapter_model.safetensors").string();
  QTUNE_CHECK(fs::exists(file), "adapter not found: ", file);
  auto st = SafetensorsFile::open(file);
  std::set<std::string> used;
  for (const auto& [path, slot] : model.slots()) {
    if (!slot->adapter()) continue;
    TensorState state = slot->adapter()->state();
    TensorState incoming;
    incoming.meta = state.meta;
    for (const auto& [key, _] : state.tensors) {
      const std::string name = kPrefix + path + "." + key;
      QTUNE_CHECK(st->has(name), file, ": missing tensor ", name,
                  " (the adapter was trained with other target modules?)");
      incoming.tensors[key] = st->tensor(name);
      used.insert(name);
    }
    slot->adapter()->load(incoming);
  }
  for (const auto& name : st->names())
    QTUNE_CHECK(used.count(name), file, ": tensor ", name,
                " has no adapter slot in this model (different target modules?)");
}

}  // namespace qtune
