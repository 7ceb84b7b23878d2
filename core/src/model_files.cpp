// Opening models on disk (HF directories, llama2.c checkpoints) and writing HF directories.
#include "qtune/model_files.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "qtune/atomic_file.h"
#include "qtune/bnb_model.h"
#include "qtune/error.h"
#include "qtune/files.h"
#include "qtune/llama2c.h"
#include "qtune/quantized_model.h"
#include "qtune/tokenizer.h"
#include "text_util.h"

namespace fs = std::filesystem;

namespace qtune {

namespace {

using detail::ends_with;

}  // namespace

// ---------------------------------------------------------------------------------------------
// Llama layout

std::vector<std::pair<std::string, std::vector<int64_t>>> llama_weight_shapes(
    const ModelConfig& c) {
  const int64_t h = c.hidden_size, q = c.num_attention_heads * c.head_dim(),
                kv = c.num_key_value_heads * c.head_dim(), inter = c.intermediate_size;
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, h}});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    auto proj = [&](const char* path, const char* short_name, int64_t rows, int64_t cols) {
      out.push_back({p + path + ".weight", {rows, cols}});
      if (c.has_bias(short_name)) out.push_back({p + path + ".bias", {rows}});
    };
    out.push_back({p + "input_layernorm.weight", {h}});
    proj("self_attn.q_proj", "q", q, h);
    proj("self_attn.k_proj", "k", kv, h);
    proj("self_attn.v_proj", "v", kv, h);
    proj("self_attn.o_proj", "o", h, q);
    out.push_back({p + "post_attention_layernorm.weight", {h}});
    proj("mlp.gate_proj", "gate", inter, h);
    proj("mlp.up_proj", "up", inter, h);
    proj("mlp.down_proj", "down", h, inter);
  }
  out.push_back({"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {c.vocab_size, h}});
  return out;
}

void check_llama_weights(const ModelConfig& config, const WeightSource& weights,
                         const std::string& origin) {
  for (const auto& [name, expected] : llama_weight_shapes(config)) {
    if (!weights.has(name) && weights.has_quantized(name)) continue;  // packed: its backend checks
    QTUNE_CHECK(weights.has(name), origin, ": tensor \"", name, "\" is missing",
                name == "lm_head.weight" ? " (config says tie_word_embeddings = false)" : "");
    auto got = weights.shape(name);
    QTUNE_CHECK(got == expected, origin, ": tensor \"", name, "\" has shape ", shape_str(got),
                ", expected ", shape_str(expected), " from the config");
  }
}

// ---------------------------------------------------------------------------------------------
// SafetensorsWeightSource

std::unique_ptr<SafetensorsWeightSource> SafetensorsWeightSource::open_file(
    const std::string& path) {
  std::unique_ptr<SafetensorsWeightSource> s(new SafetensorsWeightSource());
  s->load_file(path);
  return s;
}

std::unique_ptr<SafetensorsWeightSource> SafetensorsWeightSource::open_dir(const std::string& dir) {
  std::unique_ptr<SafetensorsWeightSource> s(new SafetensorsWeightSource());
  s->load_dir(dir);
  return s;
}

void SafetensorsWeightSource::load_file(const std::string& path) {
  QTUNE_CHECK(files_.empty(), "SafetensorsWeightSource already loaded from ", describe_);
  describe_ = path;
  files_.push_back(SafetensorsFile::open(path));
  for (const auto& n : files_[0]->names()) where_[n] = 0;
  for (const auto& kv : files_[0]->metadata()) metadata_[kv.first] = kv.second;
}

void SafetensorsWeightSource::load_dir(const std::string& dir) {
  QTUNE_CHECK(files_.empty(), "SafetensorsWeightSource already loaded from ", describe_);
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  std::error_code ec;
  if (fs::exists(single, ec)) {
    load_file(single.string());
    describe_ = dir;
    return;
  }
  QTUNE_CHECK(fs::exists(index_path, ec),
              "no model.safetensors or model.safetensors.index.json in ", dir,
              fs::exists(fs::path(dir) / "pytorch_model.bin", ec)
                  ? " (pytorch_model.bin is not supported: convert it to safetensors)"
                  : "");
  const std::string ip = index_path.string();
  Json index = read_json_file(ip);
  QTUNE_CHECK(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
              ip, ": expected an object with \"weight_map\": {tensor name: shard file}");
  describe_ = dir;
  if (index.contains("metadata")) {
    QTUNE_CHECK(index["metadata"].is_object() || index["metadata"].is_null(), ip,
                ": \"metadata\" must be an object");
    if (index["metadata"].is_object()) metadata_ = index["metadata"];
  }
  std::map<std::string, size_t> shard_ids;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    QTUNE_CHECK(it.value().is_string(), ip, ": weight_map.", it.key(),
                " must be a shard file name, got ", it.value().dump());
    const std::string shard = it.value().get<std::string>();
    // Shards live beside the index; a path that escapes the directory is not a shard name.
    QTUNE_CHECK(
        !shard.empty() && shard.find('/') == std::string::npos && shard != "." && shard != "..", ip,
        ": weight_map.", it.key(), " = \"", shard, "\" is not a file name in the model directory");
    auto found = shard_ids.find(shard);
    if (found == shard_ids.end()) {
      const std::string sp = (fs::path(dir) / shard).string();
      QTUNE_CHECK(fs::exists(sp, ec), ip, ": shard \"", shard, "\" (holding ", it.key(),
                  ") does not exist");
      found = shard_ids.emplace(shard, files_.size()).first;
      files_.push_back(SafetensorsFile::open(sp));
    }
    QTUNE_CHECK(files_[found->second]->has(it.key()), ip, ": weight_map puts tensor \"", it.key(),
                "\" in ", shard, ", which does not contain it");
    where_[it.key()] = found->second;
  }
  QTUNE_CHECK(!where_.empty(), ip, ": \"weight_map\" is empty");
}

const std::shared_ptr<SafetensorsFile>& SafetensorsWeightSource::file_of(
    const std::string& name) const {
  auto it = where_.find(name);
  QTUNE_CHECK(it != where_.end(), "tensor \"", name, "\" not found in ", describe_);
  return files_[it->second];
}

const SafetensorsTensorInfo& SafetensorsWeightSource::info(const std::string& name) const {
  return file_of(name)->info(name);
}

torch::Tensor SafetensorsWeightSource::view(const std::string& name) const {
  return file_of(name)->tensor(name);
}

std::vector<int64_t> SafetensorsWeightSource::shape(const std::string& name) const {
  return info(name).shape;
}

void check_finite_weight(const torch::Tensor& t, const std::string& where,
                         const std::string& name) {
  if (!t.is_floating_point() || torch::isfinite(t).all().item<bool>()) return;
  const int64_t nan = torch::isnan(t).sum().item<int64_t>();
  const int64_t inf = torch::isinf(t).sum().item<int64_t>();
  throw UserError(detail::concat(where, ": tensor \"", name, "\" holds ", nan, " NaN and ", inf,
                                 " infinite values; weights must be finite (a damaged file, or "
                                 "saved from a run that diverged)"));
}

torch::Tensor SafetensorsWeightSource::get(const std::string& name, torch::ScalarType dtype) const {
  const auto& file = file_of(name);
  // A weight is read as a number type: an integer or boolean tensor of the same byte size (an I32
  // embedding) would convert silently into nonsense.
  const std::string& stored = file->info(name).dtype;
  QTUNE_CHECK(!torch::isFloatingType(dtype) || stored[0] == 'F' || stored == "BF16",
              file->path(), ": tensor \"", name, "\" has dtype ", stored,
              "; model weights must be a floating type (F32, F16, BF16)");
  torch::Tensor t = view(name).to(dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
  file->release(name);  // the copy is what the caller keeps
  check_finite_weight(t, file->path(), name);
  return t;
}

std::optional<torch::ScalarType> SafetensorsWeightSource::stored_dtype(
    const std::string& name) const {
  if (!has(name)) return std::nullopt;
  const std::string& d = info(name).dtype;
  if (d == "BF16") return torch::kBFloat16;
  if (d == "F16") return torch::kHalf;
  if (d == "F32") return torch::kFloat32;
  if (d == "F64") return torch::kFloat64;
  return std::nullopt;
}

std::vector<std::string> SafetensorsWeightSource::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}

// ---------------------------------------------------------------------------------------------
// open_model

namespace {

ModelFiles open_hf_dir(const std::string& dir) {
  const std::string config_path = (fs::path(dir) / "config.json").string();
  std::error_code ec;
  QTUNE_CHECK(fs::exists(config_path, ec), "no config.json in ", dir,
              " (expected a Hugging Face model directory or a llama2.c .bin checkpoint)");
  ModelFiles m;
  const Json config_json = read_json_file(config_path);
  m.config = ModelConfig::from_hf_json(config_json, config_path);
  if (is_quantized_config(config_json))
    m.weights = open_quantized_dir(dir, config_json);  // written by qtune-quantize
  else if (is_bnb_config(config_json))
    m.weights = open_bnb_dir(dir, config_json);  // transformers' bitsandbytes 4-bit layout
  else if (config_json.contains("quantization_config") &&
           !config_json["quantization_config"].is_null()) {
    const Json& qc = config_json["quantization_config"];
    throw UserError(config_path + ": quantization_config " +
                    (qc.is_object() && qc.contains("quant_method")
                         ? "with quant_method " + qc["quant_method"].dump()
                         : qc.dump()) +
                    " is not supported (expected quant_method \"bitsandbytes\" (4-bit) or "
                    "\"qtune\")");
  } else
    m.weights = SafetensorsWeightSource::open_dir(dir);
  check_llama_weights(m.config, *m.weights, dir);
  for (const char* tok : {"tokenizer.model", "tokenizer.bin", "tokenizer.json"}) {
    fs::path p = fs::path(dir) / tok;
    if (fs::is_regular_file(p, ec)) {
      m.tokenizer_path = p.string();
      break;
    }
  }
  return m;
}

ModelFiles open_llama2c(const std::string& path) {
  auto ck = Llama2cCheckpoint::open(path);
  ModelFiles m;
  m.config = ck->config();
  // llama2.c's convention: a custom vocabulary of size V is tok{V}.bin; the Llama 2 one
  // (32000) is tokenizer.bin. Only the one beside the checkpoint is considered.
  const fs::path dir = fs::path(path).parent_path();
  std::vector<std::string> candidates = {"tok" + std::to_string(m.config.vocab_size) + ".bin"};
  if (m.config.vocab_size == 32000) candidates.push_back("tokenizer.bin");
  std::error_code ec;
  for (const auto& c : candidates)
    if (fs::is_regular_file(dir / c, ec)) {
      m.tokenizer_path = (dir / c).string();
      break;
    }
  m.weights = std::move(ck);
  return m;
}

}  // namespace

ModelFiles open_model(const std::string& path) {
  std::error_code ec;
  QTUNE_CHECK(!path.empty(), "model path is empty");
  QTUNE_CHECK(fs::exists(path, ec), "model path ", path, " does not exist");
  if (fs::is_directory(path, ec)) return open_hf_dir(path);
  const std::string name = fs::path(path).filename().string();
  // A file inside an HF directory stands for the directory.
  if (name == "config.json" || ends_with(name, ".safetensors") ||
      name == "model.safetensors.index.json") {
    std::string dir = fs::path(path).parent_path().string();
    return open_hf_dir(dir.empty() ? "." : dir);
  }
  QTUNE_CHECK(ends_with(name, ".bin"), "model path ", path,
              " is neither a Hugging Face directory nor a llama2.c .bin checkpoint");
  return open_llama2c(path);
}

// ---------------------------------------------------------------------------------------------
// save_hf_model

std::string hf_torch_dtype_name(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat32:
      return "float32";
    case torch::kBFloat16:
      return "bfloat16";
    case torch::kFloat16:
      return "float16";
    default:
      break;
  }
  throw UserError(std::string("model dtype ") + c10::toString(dtype) +
                  " is not supported for HF export (expected float32, bfloat16 or float16)");
}

void save_hf_model(const std::string& dir, const ModelConfig& config, const WeightSource& weights,
                   torch::ScalarType dtype, const std::string& tokenizer_path,
                   int64_t max_shard_bytes) {
  config.validate("model config for " + dir);
  const std::string dtype_name = hf_torch_dtype_name(dtype);
  QTUNE_CHECK(max_shard_bytes > 0, "max_shard_bytes must be > 0, got ", max_shard_bytes);
  check_llama_weights(config, weights, weights.describe());
  std::error_code ec;
  fs::create_directories(dir, ec);
  QTUNE_CHECK(fs::is_directory(dir, ec), "cannot create output directory ", dir);

  // Group tensors into shards in model order (HF's greedy rule: start a new shard when the next
  // tensor would exceed the limit).
  const int64_t itemsize = c10::elementSize(dtype);
  std::vector<std::vector<SafetensorsEntry>> shards(1);
  int64_t shard_bytes = 0, total_bytes = 0;
  for (const auto& [name, shape] : llama_weight_shapes(config)) {
    int64_t n = itemsize;
    for (int64_t d : shape) n *= d;
    if (shard_bytes > 0 && shard_bytes + n > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    const std::string tensor_name = name;
    shards.back().push_back(SafetensorsEntry{name, dtype, shape, [&weights, tensor_name, dtype] {
                                               return weights.get(tensor_name, dtype);
                                             }});
    shard_bytes += n;
    total_bytes += n;
  }

  const std::map<std::string, std::string> meta = {{"format", "pt"}};
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  if (shards.size() == 1) {
    write_safetensors(single.string(), std::move(shards[0]), meta);
    fs::remove(index_path, ec);  // a stale index of an older sharded export
  } else {
    Json weight_map = Json::object();
    char buf[64];
    const size_t n = shards.size();
    for (size_t k = 0; k < n; ++k) {
      std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", k + 1, n);
      for (const auto& e : shards[k]) weight_map[e.name] = buf;
      write_safetensors((fs::path(dir) / buf).string(), std::move(shards[k]), meta);
    }
    Json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
    atomic_write_string(index_path.string(), index.dump(2) + "\n");
    fs::remove(single, ec);  // HF loaders prefer model.safetensors: a stale one would win
  }

  Json cfg = config.to_hf_json();
  cfg["torch_dtype"] = dtype_name;
  atomic_write_string((fs::path(dir) / "config.json").string(), cfg.dump(2) + "\n");

  if (!tokenizer_path.empty()) save_tokenizer_files(tokenizer_path, dir);
}

}  // namespace qtune
