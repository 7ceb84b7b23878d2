// Model files on disk beyond the WeightSource interface: the Hugging Face Llama tensor layout,
// the safetensors-backed WeightSource of an HF directory (single file or sharded), and the HF
// directory writer used by qtune-convert and merged-model export. open_model() itself is
// declared in weight_source.h.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "qtune/export.h"
#include "qtune/model_config.h"
#include "qtune/options.h"
#include "qtune/safetensors.h"
#include "qtune/weight_source.h"

namespace qtune {

/// Every weight of a dense Llama model with `config`, as (HF name, shape), in model order:
/// model.embed_tokens.weight [vocab, hidden]; per layer i: model.layers.{i}.input_layernorm.weight
/// [hidden], self_attn.{q,k,v,o}_proj.weight ([hidden, hidden], [kv, hidden], [kv, hidden],
/// [hidden, hidden] with kv = num_key_value_heads * head_dim), post_attention_layernorm.weight
/// [hidden], mlp.{gate,up}_proj.weight [intermediate, hidden], mlp.down_proj.weight
/// [hidden, intermediate]; model.norm.weight [hidden]; lm_head.weight [vocab, hidden] unless
/// tie_word_embeddings. With an explicit head_dim, q is [heads * head_dim, hidden] and o
/// [hidden, heads * head_dim]; a projection with a bias (config.has_bias) is followed by its
/// <P>.bias [rows].
QTUNE_API std::vector<std::pair<std::string, std::vector<int64_t>>> llama_weight_shapes(
    const ModelConfig& config);

/// Checks that `weights` holds every tensor of llama_weight_shapes(config) with the right shape;
/// throws UserError naming the tensor, `origin` and both shapes otherwise. Extra tensors are fine.
QTUNE_API void check_llama_weights(const ModelConfig& config, const WeightSource& weights,
                                   const std::string& origin);

/// The weights of an HF directory: model.safetensors, or the shards listed in
/// model.safetensors.index.json ("weight_map": {tensor: shard file}). Every tensor of every
/// file is visible (float or not), memory-mapped until read.
class QTUNE_API SafetensorsWeightSource : public WeightSource {
 public:
  /// Opens `dir`/model.safetensors, else `dir`/model.safetensors.index.json. Throws UserError
  /// naming the file for a missing/malformed index, a missing shard, a tensor the index puts in
  /// a shard that lacks it.
  static std::unique_ptr<SafetensorsWeightSource> open_dir(const std::string& dir);
  /// One safetensors file.
  static std::unique_ptr<SafetensorsWeightSource> open_file(const std::string& path);

  /// Zero-copy view in the stored dtype (see SafetensorsFile::tensor: read-only memory).
  torch::Tensor view(const std::string& name) const;
  /// Header entry (stored dtype name, shape, offsets).
  const SafetensorsTensorInfo& info(const std::string& name) const;
  /// The file holding `name`.
  const std::shared_ptr<SafetensorsFile>& file_of(const std::string& name) const;
  /// Every opened file (one, or the shards in the order the index first names them).
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }
  /// The index's "metadata" object, or the single file's __metadata__ as JSON.
  const Json& metadata() const { return metadata_; }

  // WeightSource
  std::string describe() const override { return describe_; }
  bool has(const std::string& name) const override { return where_.count(name) != 0; }
  std::vector<int64_t> shape(const std::string& name) const override;
  /// A fresh contiguous CPU copy converted to `dtype`.
  torch::Tensor get(const std::string& name, torch::ScalarType dtype) const override;
  std::vector<std::string> names() const override;
  std::optional<torch::ScalarType> stored_dtype(const std::string& name) const override;

 protected:
  /// For subclasses (e.g. a pre-quantized directory): construct empty, then load_dir/load_file.
  SafetensorsWeightSource() = default;
  /// What open_dir / open_file do, into this (empty) object.
  void load_dir(const std::string& dir);
  void load_file(const std::string& path);
  std::string describe_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor -> index into files_
  Json metadata_ = Json::object();
};

/// Writes an HF Llama directory that transformers (and open_model) can load:
///   config.json        config.to_hf_json() + "torch_dtype"
///   model.safetensors  every tensor of llama_weight_shapes(config) from `weights`, converted to
///                      `dtype`, metadata {"format": "pt"}; or, when the total exceeds
///                      `max_shard_bytes`, model-0000k-of-0000n.safetensors shards plus
///                      model.safetensors.index.json
///   tokenizer.model / tokenizer.bin   a copy of `tokenizer_path` when given (by extension)
/// Tensors are read from `weights` one at a time, so peak memory is about one tensor. Every
/// file is written atomically; a stale single file / index of the other layout is removed.
/// `dir` is created if needed. Throws UserError for a missing tensor, a wrong shape, a dtype
/// other than float32/bfloat16/float16, or an I/O error.
QTUNE_API void save_hf_model(const std::string& dir, const ModelConfig& config,
                             const WeightSource& weights, torch::ScalarType dtype,
                             const std::string& tokenizer_path = "",
                             int64_t max_shard_bytes = 5'000'000'000);

/// "float32" / "bfloat16" / "float16" (HF's torch_dtype strings); throws UserError otherwise.
QTUNE_API std::string hf_torch_dtype_name(torch::ScalarType dtype);

}  // namespace qtune
