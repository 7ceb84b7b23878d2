// bitsandbytes 4-bit directories (see bnb_model.h). Key names and config fields follow
// transformers (integrations/bitsandbytes.py, quantizers/quantizer_bnb_4bit.py,
// utils/quantization_config.py BitsAndBytesConfig) and bitsandbytes (functional.py QuantState
// as_dict(packed=True) / from_dict).
#include "qtune/bnb_model.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "qtune/process.h"
#include "qtune/atomic_file.h"
#include "qtune/error.h"
#include "qtune/model.h"
#include "qtune/model_files.h"
#include "qtune/safetensors.h"
#include "qtune/tokenizer.h"
#include "weight_names.h"
#include "text_util.h"

namespace fs = std::filesystem;

namespace qtune {

using detail::module_of;

namespace {

constexpr const char* kQuantStatePrefix = "weight.quant_state.bitsandbytes__";

using detail::starts_with;

// The checks of quantization_config; returns the 4-bit quant type ("nf4").
std::string check_bnb_config(const Json& qc, const std::string& origin) {
  const std::string where = origin + ": quantization_config";
  auto flag = [&](const char* key) {
    if (!qc.contains(key) || qc[key].is_null()) return false;
    QTUNE_CHECK(qc[key].is_boolean(), where, ".", key, " must be true or false, got ",
                qc[key].dump());
    return qc[key].get<bool>();
  };
  QTUNE_CHECK(!flag("load_in_8bit"), where,
              ".load_in_8bit = true: 8-bit bitsandbytes (LLM.int8) checkpoints are not supported "
              "(expected a 4-bit one, load_in_4bit = true)");
  QTUNE_CHECK(flag("load_in_4bit"), where, ".load_in_4bit must be true, got ",
              qc.value("load_in_4bit", Json(nullptr)).dump());
  const Json type = qc.value("bnb_4bit_quant_type", Json("fp4"));  // BitsAndBytesConfig default
  QTUNE_CHECK(type.is_string(), where, ".bnb_4bit_quant_type must be a string, got ", type.dump());
  QTUNE_CHECK(type != "fp4", where,
              ".bnb_4bit_quant_type = \"fp4\" is not supported: qtune reads bitsandbytes' 4-bit "
              "NormalFloat checkpoints (bnb_4bit_quant_type \"nf4\"), not its 4-bit float code");
  QTUNE_CHECK(type == "nf4", where, ".bnb_4bit_quant_type = ", type.dump(),
              " is not supported (expected \"nf4\")");
  const Json storage = qc.value("bnb_4bit_quant_storage", Json("uint8"));
  QTUNE_CHECK(storage.is_null() || storage == "uint8" || storage == "int8" ||
                  storage == "float16" || storage == "bfloat16" || storage == "float32",
              where, ".bnb_4bit_quant_storage = ", storage.dump(),
              " is not supported (expected uint8, int8, float16, bfloat16 or float32)");
  const Json cd = qc.value("bnb_4bit_compute_dtype", Json(nullptr));
  QTUNE_CHECK(cd.is_null() || cd == "float32" || cd == "bfloat16" || cd == "float16", where,
              ".bnb_4bit_compute_dtype = ", cd.dump(),
              " is not supported (expected float32, bfloat16 or float16)");
  if (qc.contains("llm_int8_skip_modules") && !qc["llm_int8_skip_modules"].is_null()) {
    QTUNE_CHECK(qc["llm_int8_skip_modules"].is_array(), where,
                ".llm_int8_skip_modules must be a list of module names or null, got ",
                qc["llm_int8_skip_modules"].dump());
    for (const auto& m : qc["llm_int8_skip_modules"])
      QTUNE_CHECK(m.is_string(), where, ".llm_int8_skip_modules must hold names, got ", m.dump());
  }
  return type.get<std::string>();
}

class BnbDirSource : public SafetensorsWeightSource {
 public:
  BnbDirSource(const std::string& dir, const Json& qc) {
    const std::string origin = (fs::path(dir) / "config.json").string();
    quant_type_ = check_bnb_config(qc, origin);
    const Json double_quant = qc.value("bnb_4bit_use_double_quant", Json(false));
    QTUNE_CHECK(double_quant.is_boolean() || double_quant.is_null(), origin,
                ": quantization_config.bnb_4bit_use_double_quant must be true or false, got ",
                double_quant.dump());
    double_quant_ = double_quant.is_boolean() && double_quant.get<bool>();
    load_dir(dir);
    describe_ = dir + " (bitsandbytes " + quant_type_ + ")";
    const std::string suffix = std::string(".") + kQuantStatePrefix;
    for (const auto& n : SafetensorsWeightSource::names()) {
      const auto at = n.find(suffix);
      if (at == std::string::npos) continue;
      const std::string type = n.substr(at + suffix.size());
      QTUNE_CHECK(type == quant_type_, describe_, ": tensor ", n, " holds a bitsandbytes__", type,
                  " state, but quantization_config says ", quant_type_);
      modules_.insert(n.substr(0, at));
    }
    QTUNE_CHECK(!modules_.empty(), describe_, ": no tensor named <module>.", kQuantStatePrefix,
                quant_type_, " (is this a bitsandbytes 4-bit checkpoint?)");
  }

  bool has_quantized(const std::string& name) const override {
    return name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0 &&
           modules_.count(module_of(name)) > 0;
  }
  bool has(const std::string& name) const override {
    if (has_quantized(name)) return false;
    // The packed parts of a quantized weight are not model tensors of their own.
    for (const auto& m : modules_)
      if (starts_with(name, m + ".weight.")) return false;
    return SafetensorsWeightSource::has(name);
  }
  TensorState quantized(const std::string& name) const override {
    QTUNE_CHECK(has_quantized(name), describe_, ": ", name, " is not stored quantized");
    const std::string prefix = module_of(name) + ".";
    TensorState s;
    for (const auto& n : SafetensorsWeightSource::names()) {
      if (n != prefix + "weight" && !starts_with(n, prefix + "weight.")) continue;
      torch::Tensor t = view(n);
      // bnb_4bit_quant_storage other than uint8 only relabels the packed bytes.
      if (n == prefix + "weight" && t.scalar_type() != torch::kUInt8)
        t = t.contiguous().view(torch::kUInt8).reshape({-1, 1});
      s.tensors[n.substr(prefix.size())] = t;
    }
    const bool nested = s.tensors.count("weight.nested_absmax") > 0;
    QTUNE_CHECK(nested == double_quant_, describe_, ": ", name,
                nested ? " has nested absmax tensors but quantization_config."
                         "bnb_4bit_use_double_quant is false"
                       : " has no weight.nested_absmax but quantization_config."
                         "bnb_4bit_use_double_quant is true");
    s.meta = {{"backend", quant_type_}, {"shape", shape(name)}};
    return s;
  }
  std::vector<int64_t> shape(const std::string& name) const override {
    if (!has_quantized(name)) return SafetensorsWeightSource::shape(name);
    const std::string key = module_of(name) + "." + kQuantStatePrefix + quant_type_;
    torch::Tensor bytes = view(key).contiguous();
    QTUNE_CHECK(bytes.scalar_type() == torch::kUInt8, describe_, ": ", key,
                " must be uint8 JSON bytes");
    Json qs;
    try {
      qs = Json::parse(std::string(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()),
                                   static_cast<size_t>(bytes.numel())));
      return qs.at("shape").get<std::vector<int64_t>>();
    } catch (const Json::exception& e) {
      throw UserError(describe_ + ": " + key +
                      " is not a QuantState JSON with a \"shape\": " + e.what());
    }
  }

 private:
  std::string quant_type_;
  bool double_quant_ = false;
  std::set<std::string> modules_;  // quantized module paths
};

}  // namespace

bool is_bnb_config(const Json& config) {
  return config.contains("quantization_config") && config["quantization_config"].is_object() &&
         config["quantization_config"].value("quant_method", Json()) == "bitsandbytes";
}

std::unique_ptr<WeightSource> open_bnb_dir(const std::string& dir, const Json& config_json) {
  return std::make_unique<BnbDirSource>(dir, config_json.at("quantization_config"));
}

int64_t save_bnb_model(const std::string& dir, const ModelConfig& config,
                       const WeightSource& weights, const QuantBackend& backend,
                       const Json& options, const std::vector<std::string>& skip_modules,
                       torch::ScalarType dense_dtype, const std::string& tokenizer_path) {
  config.validate(weights.describe());
  check_llama_weights(config, weights, weights.describe());
  std::error_code ec;
  fs::create_directories(dir, ec);
  QTUNE_CHECK(fs::is_directory(dir, ec), "cannot create output directory ", dir);

  std::vector<SafetensorsEntry> entries;
  std::vector<std::string> skipped;  // written out as llm_int8_skip_modules
  std::string quant_type;
  bool double_quant = false;
  int64_t quantized_bytes = 0;
  for (const auto& [name, shape] : llama_weight_shapes(config)) {
    const bool projection = shape.size() == 2 && name != "model.embed_tokens.weight";
    const std::string module = projection ? module_of(name) : "";
    // transformers never quantizes the output head (get_keys_to_not_convert).
    const bool quantize =
        projection && module != "lm_head" && !module_matches(module, skip_modules);
    if (projection && !quantize) skipped.push_back(module);
    if (!quantize) {
      const WeightSource* src = &weights;
      const std::string n = name;
      entries.push_back(
          {name, dense_dtype, shape, [src, n, dense_dtype] { return src->get(n, dense_dtype); }});
      continue;
    }
    auto q = backend.quantize(weights.get(name, torch::kFloat32), options);
    return_freed_heap();
    quantized_bytes += q->nbytes();
    TensorState st = q->state();
    std::string type;
    for (const auto& [key, _] : st.tensors)
      if (starts_with(key, kQuantStatePrefix))
        type = key.substr(std::string(kQuantStatePrefix).size());
    QTUNE_CHECK(!type.empty(), "--format bnb: the ", backend.name(),
                " backend does not store bitsandbytes' layout (its state has no ",
                kQuantStatePrefix, "* tensor); use a backend that does, or the qtune format");
    QTUNE_CHECK(quant_type.empty() || type == quant_type, "--format bnb: ", name,
                " got a bitsandbytes__", type, " state after ", quant_type);
    quant_type = type;
    double_quant = st.tensors.count("weight.nested_absmax") > 0;
    for (auto& [key, t] : st.tensors) {
      torch::Tensor keep = t.contiguous().cpu();
      entries.push_back(
          {module + "." + key, keep.scalar_type(), keep.sizes().vec(), [keep] { return keep; }});
    }
    spdlog::debug("quantized {}", name);
  }
  QTUNE_CHECK(!quant_type.empty(),
              "--format bnb: every projection is kept dense; nothing to "
              "quantize");
  // A given skip list replaces transformers' own (which holds the head), so the head is named
  // even when it is tied and has no tensor: else transformers makes it a Linear4bit over the
  // dense embedding.
  if (std::find(skipped.begin(), skipped.end(), "lm_head") == skipped.end())
    skipped.push_back("lm_head");
  write_safetensors((fs::path(dir) / "model.safetensors").string(), std::move(entries),
                    {{"format", "pt"}});

  Json cfg = config.to_hf_json();
  const std::string dtype_name = hf_torch_dtype_name(dense_dtype);
  cfg["torch_dtype"] = dtype_name;
  cfg["quantization_config"] = {{"quant_method", "bitsandbytes"},
                                {"load_in_4bit", true},
                                {"load_in_8bit", false},
                                {"_load_in_4bit", true},
                                {"_load_in_8bit", false},
                                {"bnb_4bit_quant_type", quant_type},
                                {"bnb_4bit_use_double_quant", double_quant},
                                {"bnb_4bit_compute_dtype", dtype_name},
                                {"bnb_4bit_quant_storage", "uint8"},
                                {"llm_int8_skip_modules", skipped},
                                {"llm_int8_threshold", 6.0},
                                {"llm_int8_has_fp16_weight", false},
                                {"llm_int8_enable_fp32_cpu_offload", false}};
  atomic_write_string((fs::path(dir) / "config.json").string(), cfg.dump(2) + "\n");
  if (!tokenizer_path.empty()) save_tokenizer_files(tokenizer_path, dir);
  return quantized_bytes;
}

}  // namespace qtune
