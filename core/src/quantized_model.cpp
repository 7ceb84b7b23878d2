// Pre-quantized model directories (see quantized_model.h).
#include "qtune/quantized_model.h"

#include <filesystem>

#include <spdlog/spdlog.h>

#include "qtune/atomic_file.h"
#include "qtune/error.h"
#include "qtune/model.h"
#include "qtune/model_files.h"
#include "qtune/safetensors.h"
#include "qtune/process.h"
#include "qtune/tokenizer.h"
#include "weight_names.h"

namespace fs = std::filesystem;

namespace qtune {

using detail::module_of;

namespace {

constexpr const char* kMetaPrefix = "qtune:";
constexpr int kFormatVersion = 1;

bool is_projection(const std::string& name, const std::vector<int64_t>& shape) {
  return shape.size() == 2 && name != "model.embed_tokens.weight";
}

class QuantizedDirSource : public SafetensorsWeightSource {
 public:
  QuantizedDirSource(const std::string& dir, const Json& qc) : qc_(qc) {
    load_dir(dir);
    const Json backend = qc.value("backend", Json());
    QTUNE_CHECK(backend.is_string(), dir,
                "/config.json: quantization_config.backend must be the name of a quantization "
                "plugin (a string), got ",
                backend.dump());
    describe_ = dir + " (quantized with " + backend.get<std::string>() + ")";
    for (const auto& f : files_)
      for (const auto& [k, v] : f->metadata())
        if (k.rfind(kMetaPrefix, 0) == 0) meta_[k.substr(std::string(kMetaPrefix).size())] = v;
  }
  bool has_quantized(const std::string& name) const override { return meta_.count(name) > 0; }
  bool has(const std::string& name) const override {
    return !has_quantized(name) && SafetensorsWeightSource::has(name);
  }
  TensorState quantized(const std::string& name) const override {
    TensorState s;
    s.meta = parsed_meta(name);
    const std::string prefix = module_of(name) + ".";
    for (const auto& n : SafetensorsWeightSource::names())
      if (n.rfind(prefix, 0) == 0) s.tensors[n.substr(prefix.size())] = view(n);
    QTUNE_CHECK(!s.tensors.empty(), describe_, ": no tensors under ", prefix);
    return s;
  }
  std::vector<int64_t> shape(const std::string& name) const override {
    if (!has_quantized(name)) return SafetensorsWeightSource::shape(name);
    // The file's own word for the logical shape, read before any backend sees the state (its
    // load() checks the rest, state_layout.h).
    const Json meta = parsed_meta(name);
    const Json shape = meta.is_object() ? meta.value("shape", Json()) : Json();
    bool ok = shape.is_array() && shape.size() == 2;
    for (const Json& d : shape) ok = ok && d.is_number_integer() && d.get<int64_t>() >= 0;
    QTUNE_CHECK(ok, describe_, ": metadata of ", name,
                " must be an object with \"shape\": [out, in] (two integers >= 0), got ",
                meta.dump());
    return shape.get<std::vector<int64_t>>();
  }

 private:
  // The JSON meta stored for quantized weight `name`.
  Json parsed_meta(const std::string& name) const {
    auto it = meta_.find(name);
    QTUNE_CHECK(it != meta_.end(), describe_, ": ", name, " is not stored quantized");
    try {
      return Json::parse(it->second);
    } catch (const Json::exception& e) {
      throw UserError(describe_ + ": metadata of " + name + " is not valid JSON: " + e.what());
    }
  }

  Json qc_;
  std::map<std::string, std::string> meta_;  // weight name -> state meta JSON
};

}  // namespace

bool is_quantized_config(const Json& config) {
  return config.contains("quantization_config") && config["quantization_config"].is_object() &&
         config["quantization_config"].value("quant_method", Json()) == "qtune";  // any type
}

std::unique_ptr<WeightSource> open_quantized_dir(const std::string& dir, const Json& config_json) {
  const Json& qc = config_json.at("quantization_config");
  const Json version = qc.value("format_version", Json());
  QTUNE_CHECK(version.is_number_integer() && version.get<int64_t>() == kFormatVersion, dir,
              "/config.json: quantization_config.format_version must be ", kFormatVersion, ", got ",
              version.dump(), " (re-run qtune-quantize with this version)");
  return std::make_unique<QuantizedDirSource>(dir, qc);
}

int64_t save_quantized_model(const std::string& dir, const ModelConfig& config,
                             const WeightSource& weights, const QuantBackend& backend,
                             const Json& options, bool skip_output, torch::ScalarType dense_dtype,
                             const std::string& tokenizer_path,
                             const std::vector<std::string>& skip_modules) {
  config.validate(weights.describe());
  check_llama_weights(config, weights, weights.describe());
  std::error_code ec;
  fs::create_directories(dir, ec);
  QTUNE_CHECK(fs::is_directory(dir, ec), "cannot create output directory ", dir);

  std::vector<SafetensorsEntry> entries;
  std::map<std::string, std::string> metadata{{"format", "pt"}};
  int64_t quantized_bytes = 0;
  auto add_quantized = [&](const std::string& name, torch::Tensor w) {
    auto q = backend.quantize(w, options);
    w = torch::Tensor();  // the full-precision copy
    return_freed_heap();
    TensorState st = q->state();
    quantized_bytes += q->nbytes();
    metadata[kMetaPrefix + name] = st.meta.dump();
    for (auto& [key, t] : st.tensors) {
      SafetensorsEntry e;
      e.name = module_of(name) + "." + key;
      e.dtype = t.scalar_type();
      e.shape = t.sizes().vec();
      torch::Tensor keep = t.contiguous().cpu();
      e.make = [keep] { return keep; };
      entries.push_back(std::move(e));
    }
  };
  for (const auto& [name, shape] : llama_weight_shapes(config)) {
    const bool head = name == "lm_head.weight";
    if (is_projection(name, shape) && !(head && skip_output) &&
        !module_matches(module_of(name), skip_modules)) {
      add_quantized(name, weights.get(name, torch::kFloat32));
      spdlog::debug("quantized {}", name);
      continue;
    }
    SafetensorsEntry e;
    e.name = name;
    e.dtype = dense_dtype;
    e.shape = shape;
    const WeightSource* src = &weights;
    const std::string n = name;
    e.make = [src, n, dense_dtype] { return src->get(n, dense_dtype); };
    entries.push_back(std::move(e));
  }
  if (config.tie_word_embeddings && !skip_output && !module_matches("lm_head", skip_modules))
    add_quantized("lm_head.weight", weights.get("model.embed_tokens.weight", torch::kFloat32));

  write_safetensors((fs::path(dir) / "model.safetensors").string(), std::move(entries), metadata);
  Json cfg = config.to_hf_json();
  cfg["torch_dtype"] = hf_torch_dtype_name(dense_dtype);
  cfg["quantization_config"] = {{"quant_method", "qtune"},
                                {"backend", backend.name()},
                                {"options", options},
                                {"skip_output", skip_output},
                                {"skip_modules", skip_modules},
                                {"format_version", kFormatVersion}};
  atomic_write_string((fs::path(dir) / "config.json").string(), cfg.dump(2) + "\n");
  if (!tokenizer_path.empty()) save_tokenizer_files(tokenizer_path, dir);
  return quantized_bytes;
}

}  // namespace qtune
