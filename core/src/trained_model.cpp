// Rebuilding a trained model for export and generation (see trained_model.h).
#include "qtune/trained_model.h"

#include <algorithm>
#include <filesystem>
#include <set>

#include "qtune/checkpoint.h"
#include "qtune/error.h"
#include "qtune/model_files.h"
#include "qtune/peft.h"
#include "qtune/run_identity.h"

namespace fs = std::filesystem;

namespace qtune {

namespace {

// The adapter plugin options a PEFT LoraConfig implies, for adapters trained by other tools.
Json peft_lora_options(const Json& config, const AdapterFactory& factory) {
  Json out = Json::object();
  std::set<std::string> names;
  for (const auto& o : factory.option_schema()) names.insert(o.name);
  const std::pair<const char*, const char*> map[] = {{"r", "rank"},
                                                     {"lora_alpha", "alpha"},
                                                     {"lora_dropout", "dropout"},
                                                     {"use_rslora", "use_rslora"}};
  for (const auto& [peft_key, ours] : map)
    if (config.contains(peft_key) && !config[peft_key].is_null() && names.count(ours))
      out[ours] = config[peft_key];
  return out;
}

// What training recorded beside the trained weights: the run identity and tokenizer of a
// checkpoint or a qtune adapter, the PEFT config of any adapter.
struct Recorded {
  bool checkpoint = false;
  CheckpointState state;
  Json peft_config;  // adapters only
  Json identity;     // null for an adapter of another tool
  std::string tokenizer;
};

Recorded read_recorded(const std::string& dir) {
  Recorded r;
  if (dir.empty()) return r;
  r.checkpoint = is_checkpoint_dir(dir);
  if (r.checkpoint) {
    r.state = read_checkpoint_state(dir);
    r.identity = r.state.identity;
    r.tokenizer = r.state.tokenizer;
    return r;
  }
  QTUNE_CHECK(fs::is_directory(dir), "adapter directory not found: ", dir);
  r.peft_config = read_peft_config(dir);
  Json info = read_peft_qtune_info(dir);
  if (info.is_object()) {
    r.identity = info.value("identity", Json());
    r.tokenizer = info.value("tokenizer", "");
  }
  return r;
}

// The base model: given, else the one the identity or the PEFT config records.
std::string base_path(const TrainedModelOptions& o, const Recorded& r) {
  std::string path = o.model_path;
  if (path.empty() && r.identity.is_object()) path = r.identity["base"].value("path", "");
  if (path.empty() && r.peft_config.is_object())
    path = r.peft_config.value("base_model_name_or_path", "");
  QTUNE_CHECK(!path.empty(), "no base model: give --model");
  QTUNE_CHECK(fs::exists(path), "base model not found: ", path,
              !o.adapter_dir.empty() && o.model_path.empty()
                  ? " (recorded by the adapter; give --model)"
                  : "");
  return path;
}

// The spec a qtune run recorded, checked against the base it is rebuilt on.
TuningSpec recorded_spec(const TrainedModelOptions& o, const Recorded& r, const TrainedModel& out,
                         const ModelFiles& files, const Registry& registry) {
  const std::string what = (r.checkpoint ? "checkpoint " : "adapter ") + o.adapter_dir;
  check_base_identity(r.identity.at("base"),
                      base_identity(out.base_path, files.config, *files.weights), what);
  TuningSpec spec = TuningSpec::from_identity(r.identity, registry);
  spec.dtype = o.dtype;
  const Json pq = prequantized_options(*files.weights);
  if (pq.is_null()) return spec;
  QTUNE_CHECK(spec.quantized_base(), what, ": it was trained (", spec.name(),
              ") on a full-precision base, but ", out.base_path, " is quantized with ",
              pq["backend"].get<std::string>(), "; pass the original model with --model");
  // A qtune-quantize directory of the right base: it must also be quantized the same way.
  const auto& quant = spec.base.quant;
  const Json pq_options = quant->check_options(pq["options"], out.base_path);
  QTUNE_CHECK(pq["backend"] == quant->name() && pq_options == spec.base.quant_options, what,
              ": it was trained on a base quantized with ", quant->name(), " ",
              spec.base.quant_options.dump(), ", but ", out.base_path, " is quantized with ",
              pq["backend"].get<std::string>(), " ", pq_options.dump());
  return spec;
}

// The spec of a base alone or of an adapter another tool wrote: the base is quantized as the
// directory was (a qtune-quantize directory) or as --base_quant asks; PEFT's config says what
// the adapter is.
TuningSpec untracked_spec(const TrainedModelOptions& o, const Recorded& r,
                          const std::string& base, const ModelFiles& files,
                          const Registry& registry) {
  const Json pq = prequantized_options(*files.weights);
  std::shared_ptr<QuantBackend> quant;
  Json quant_options = o.quant_options;
  if (!pq.is_null()) {
    QTUNE_CHECK(o.quant.empty() || o.quant == pq["backend"], "--base_quant ", o.quant, ": ", base,
                " is already quantized with ", pq["backend"].get<std::string>());
    quant = registry.quant(pq["backend"].get<std::string>());
    quant_options = pq["options"];
  } else if (!o.quant.empty()) {
    quant = registry.quant(o.quant);
  }
  TuningSpec spec = TuningSpec::for_base(o.dtype, quant, quant_options);
  if (o.adapter_dir.empty()) return spec;
  const std::string cfg_file = (fs::path(o.adapter_dir) / "adapter_config.json").string();
  const Json& peft = r.peft_config;
  std::string type = peft["peft_type"].get<std::string>();
  std::transform(type.begin(), type.end(), type.begin(), ::tolower);
  // PEFT spells DoRA as a LoRA config with use_dora; the adapter plugin is named "dora".
  if (type == "lora" && peft.value("use_dora", Json(false)) == Json(true)) type = "dora";
  AdapterSpec& a = spec.adapter;
  a.factory = registry.adapter(type);
  a.options = a.factory->check_options(peft_lora_options(peft, *a.factory),
                              cfg_file);
  QTUNE_CHECK(peft.contains("target_modules") && peft["target_modules"].is_array(), cfg_file,
              ": target_modules must be a list of module names (patterns are not supported)");
  a.target_modules = parse_target_modules(peft["target_modules"].get<std::vector<std::string>>(),
                                          cfg_file + " target_modules");
  return spec;
}

}  // namespace

TrainedModel load_trained_model(const TrainedModelOptions& o, const Registry& registry) {
  const Recorded rec = read_recorded(o.adapter_dir);
  const bool recorded = rec.identity.is_object();
  QTUNE_CHECK(o.quant.empty() || !recorded, "--base_quant: ", o.adapter_dir,
              " records how its base was quantized; it is rebuilt that way");
  TrainedModel out;
  out.identity = rec.identity;
  out.base_path = base_path(o, rec);
  ModelFiles files = open_model(out.base_path);
  out.config = files.config;
  const TuningSpec spec = recorded ? recorded_spec(o, rec, out, files, registry)
                                   : untracked_spec(o, rec, out.base_path, files, registry);
  out.model = LlamaForCausalLM(files.config, *files.weights, spec);
  files.weights.reset();
  if (rec.checkpoint) {
    load_checkpoint_weights(o.adapter_dir, rec.state, *out.model);
  } else if (!o.adapter_dir.empty()) {
    load_peft_adapter(o.adapter_dir, *out.model);  // the base was checked above
  }
  out.model->eval();
  out.tokenizer_path = files.tokenizer_path;
  if (!rec.tokenizer.empty() && fs::exists(rec.tokenizer)) out.tokenizer_path = rec.tokenizer;
  return out;
}

}  // namespace qtune
