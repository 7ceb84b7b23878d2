// karpathy/llama2.c checkpoints (the "legacy v0" .bin format written by export.py and read by
// run.c), presented as a WeightSource with Hugging Face Llama names and layout.
//
// File: 7 x int32 header {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len}
// (vocab_size < 0 means a separate classifier follows), then fp32 arrays: token_embedding
// [vocab, dim], rms_att [L, dim], wq [L, dim, dim], wk [L, kv_dim, dim], wv [L, kv_dim, dim],
// wo [L, dim, dim], rms_ffn [L, dim], w1 [L, hidden, dim], w2 [L, dim, hidden],
// w3 [L, hidden, dim], rms_final [dim], freq_cis_real and freq_cis_imag [seq_len, head_size/2]
// (ignored), then wcls [vocab, dim] when not shared. See docs/formats.md.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "qtune/export.h"
#include "qtune/model_config.h"
#include "qtune/weight_source.h"

namespace qtune {

/// The decoded header; vocab_size is positive here and `shared_classifier` holds its sign.
struct Llama2cHeader {
  int64_t dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0;
  int64_t vocab_size = 0, seq_len = 0;
  bool shared_classifier = true;
  /// Bytes a well-formed v0 file with this header has (28 header bytes + 4 per float).
  int64_t expected_file_size() const;
};

/// Rotary layouts. llama2.c (like Meta's original Llama code) rotates interleaved pairs
/// (2i, 2i+1) of each head; Hugging Face rotates (i, i + head_dim/2) ("rotate_half"). Permuting
/// the output rows of wq/wk once makes an HF-layout model compute exactly what llama2.c does.
/// w: [n_heads * head_dim, in]. This is transformers' convert_llama_weights_to_hf.py `permute`:
/// w.view(n_heads, head_dim/2, 2, in).transpose(1, 2).reshape(out, in). Returns a new tensor.
QTUNE_API torch::Tensor rope_interleaved_to_half(const torch::Tensor& w, int64_t n_heads);
/// The inverse permutation (HF layout back to llama2.c / Meta layout).
QTUNE_API torch::Tensor rope_half_to_interleaved(const torch::Tensor& w, int64_t n_heads);

/// A memory-mapped llama2.c v0 checkpoint. Tensor names are HF Llama names
/// (model.embed_tokens.weight, model.layers.{i}.self_attn.q_proj.weight, ..., lm_head.weight only
/// when the classifier is not shared); w1 -> mlp.gate_proj, w3 -> mlp.up_proj, w2 ->
/// mlp.down_proj. get() returns q_proj/k_proj already permuted to the HF rotary layout.
class QTUNE_API Llama2cCheckpoint : public WeightSource {
 public:
  /// Maps and validates `path`: header values, and the file size exactly (the message gives the
  /// expected and the actual byte count). A llama2.c "version 1/2" export (magic "ak42") is
  /// refused with a message saying so. Throws UserError naming the path.
  static std::unique_ptr<Llama2cCheckpoint> open(const std::string& path);
  ~Llama2cCheckpoint() override;

  const Llama2cHeader& header() const { return header_; }
  /// HF config: rms_norm_eps 1e-5, rope_theta 10000, max_position_embeddings = seq_len,
  /// tie_word_embeddings = shared classifier, bos 1, eos 2 (llama2.c's conventions).
  ModelConfig config() const;
  const std::string& path() const { return path_; }

  /// Zero-copy fp32 view of a tensor in llama2.c layout (q/k NOT permuted), viewing the
  /// read-only mapping; the mapping stays alive while the view does. Do not write into it.
  torch::Tensor raw(const std::string& name) const;

  // WeightSource
  std::string describe() const override;
  bool has(const std::string& name) const override;
  std::vector<int64_t> shape(const std::string& name) const override;
  /// A fresh contiguous CPU copy in `dtype`; q/k permuted to the HF rotary layout.
  torch::Tensor get(const std::string& name, torch::ScalarType dtype) const override;
  std::vector<std::string> names() const override;

 private:
  struct Entry {
    int64_t offset = 0;  // in bytes from the start of the file
    std::vector<int64_t> shape;
    int64_t rope_heads = 0;  // > 0: permute rows for this many heads (q/k)
  };
  Llama2cCheckpoint() = default;
  const Entry& entry(const std::string& name) const;

  std::string path_;
  std::shared_ptr<void> mapping_;  // keeps the mapping alive (detail::MappedFile)
  const uint8_t* data_ = nullptr;  // start of the file
  Llama2cHeader header_;
  std::map<std::string, Entry> entries_;
  std::vector<std::string> order_;  // names in file order
};

}  // namespace qtune
