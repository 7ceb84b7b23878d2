// The tuning spec and its parsers (see tuning_spec.h).
#include "qtune/tuning_spec.h"

#include <fnmatch.h>

#include <algorithm>

#include "qtune/error.h"
#include "qtune/registry.h"

namespace qtune {

TrainType parse_train_type(const std::string& s) {
  if (s == "full") return TrainType::kFull;
  if (s == "lora") return TrainType::kLora;
  if (s == "qlora") return TrainType::kQlora;
  throw UserError("train_type must be one of full, lora, qlora; got '" + s + "'");
}

std::string to_string(TrainType t) {
  switch (t) {
    case TrainType::kFull: return "full";
    case TrainType::kLora: return "lora";
    case TrainType::kQlora: return "qlora";
  }
  return "?";
}

torch::ScalarType parse_dtype(const std::string& s, const std::string& key) {
  if (s == "fp32" || s == "float32") return torch::kFloat32;
  if (s == "bf16" || s == "bfloat16") return torch::kBFloat16;
  throw UserError(key + " must be fp32 or bf16, got '" + s + "'");
}

const std::vector<std::string>& all_target_modules() {
  static const std::vector<std::string> names{"q", "k", "v", "o", "gate", "up", "down", "output"};
  return names;
}

std::set<std::string> parse_target_modules(const std::vector<std::string>& names,
                                           const std::string& key) {
  std::set<std::string> out;
  const auto& all = all_target_modules();
  for (const auto& raw : names) {
    std::string n = raw;
    // Accept the Hugging Face spellings too (q_proj, lm_head), as PEFT users write them.
    if (n.size() > 5 && n.compare(n.size() - 5, 5, "_proj") == 0) n = n.substr(0, n.size() - 5);
    if (n == "lm_head") n = "output";
    if (n == "all-linear") {
      // PEFT's all-linear leaves the output head out; so do we.
      for (const auto& a : all)
        if (a != "output") out.insert(a);
      continue;
    }
    QTUNE_CHECK(std::find(all.begin(), all.end(), n) != all.end(), key, " has unknown module '",
                raw, "' (expected any of q, k, v, o, gate, up, down, output, or all-linear)");
    out.insert(n);
  }
  QTUNE_CHECK(!out.empty(), key, " must name at least one module");
  return out;
}

bool module_matches(const std::string& path, const std::vector<std::string>& patterns) {
  const std::string dotted = "." + path + ".";
  for (const auto& p : patterns) {
    if (p.find_first_of("*?[") != std::string::npos) {
      if (fnmatch(p.c_str(), path.c_str(), 0) == 0) return true;
    } else if (!p.empty() && dotted.find("." + p + ".") != std::string::npos) {
      return true;
    }
  }
  return false;
}

std::string TuningSpec::name() const {
  switch (base.kind) {
    case BaseSpec::Kind::kTrainable: return "full";
    case BaseSpec::Kind::kFrozen: return adapter.present() ? "lora" : "frozen";
    case BaseSpec::Kind::kQuantized: return adapter.present() ? "qlora" : "quantized";
  }
  return "?";
}

void TuningSpec::validate() const {
  QTUNE_CHECK(!quantized_base() || base.quant,
              "train_type qlora needs a quantization backend (--quant)");
  QTUNE_CHECK(!trainable_base() || !adapter.present(),
              "a trainable base (train_type full) takes no adapter");
  QTUNE_CHECK(!adapter.present() || !adapter.target_modules.empty(),
              "adapter.target_modules must name at least one module");
}

namespace {

void set_quant(BaseSpec& b, const Registry& registry, const std::string& name, const Json& options,
               bool skip_output, const std::string& key) {
  b.kind = BaseSpec::Kind::kQuantized;
  b.quant = registry.quant(name);
  b.quant_options = b.quant->check_options(options, key);
  b.quant_skip_output = skip_output;
}

void set_adapter(AdapterSpec& a, const Registry& registry, const std::string& name,
                 const Json& options, const std::vector<std::string>& targets,
                 const std::string& key) {
  a.factory = registry.adapter(name);
  a.options = a.factory->check_options(options, key + "options");
  a.target_modules = parse_target_modules(targets, key + "target_modules");
}

}  // namespace

TuningSpec TuningSpec::for_training(TrainType type, torch::ScalarType dtype,
                                    const Registry& registry, const std::string& quant_name,
                                    const Json& quant_options, bool quant_skip_output,
                                    const std::string& adapter_name, const Json& adapter_options,
                                    const std::vector<std::string>& targets,
                                    const std::vector<std::string>& quant_skip_modules) {
  TuningSpec s;
  s.dtype = dtype;
  s.base.kind = type == TrainType::kFull ? BaseSpec::Kind::kTrainable : BaseSpec::Kind::kFrozen;
  if (type == TrainType::kQlora) {
    set_quant(s.base, registry, quant_name, quant_options, quant_skip_output, "quant.options");
    s.base.quant_skip_modules = quant_skip_modules;
  }
  if (type != TrainType::kFull)
    set_adapter(s.adapter, registry, adapter_name, adapter_options, targets, "adapter.");
  s.validate();
  return s;
}

TuningSpec TuningSpec::from_identity(const Json& id, const Registry& registry) {
  const TrainType type = parse_train_type(id.at("train_type").get<std::string>());
  TuningSpec s;
  s.dtype = parse_dtype(id.value("dtype", "fp32"), "dtype");
  s.base.kind = type == TrainType::kFull ? BaseSpec::Kind::kTrainable : BaseSpec::Kind::kFrozen;
  if (type == TrainType::kQlora) {
    set_quant(s.base, registry, id.at("quant").get<std::string>(), id.at("quant_options"),
              id.value("quant_skip_output", false), "quant.options");
    if (id.value("quant_skip_modules", Json()).is_array())
      s.base.quant_skip_modules = id["quant_skip_modules"].get<std::vector<std::string>>();
  }
  if (type != TrainType::kFull)
    set_adapter(s.adapter, registry, id.at("adapter").get<std::string>(), id.at("adapter_options"),
                id.at("target_modules").get<std::vector<std::string>>(), "");
  s.validate();
  return s;
}

TuningSpec TuningSpec::for_base(torch::ScalarType dtype, std::shared_ptr<QuantBackend> quant,
                                const Json& quant_options, bool quant_skip_output) {
  TuningSpec s;
  s.dtype = dtype;
  s.base.kind = quant ? BaseSpec::Kind::kQuantized : BaseSpec::Kind::kFrozen;
  s.base.quant = std::move(quant);
  if (s.base.quant)
    s.base.quant_options =
        s.base.quant->check_options(quant_options, "quant.options");
  s.base.quant_skip_output = quant_skip_output;
  return s;
}

}  // namespace qtune
