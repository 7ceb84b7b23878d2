// Llama-family architecture hyper-parameters, read from and written to Hugging Face config.json.
// One decoder covers the families transformers calls llama (Llama 1-3.x), mistral and qwen2; what
// differs between them is data here: rotary scaling, an explicit head size, projection biases and
// a sliding attention window.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qtune/export.h"
#include "qtune/options.h"

namespace qtune {

/// Rotary-embedding frequency scaling, HF's `rope_scaling` (transformers' modeling_rope_utils):
/// "default" (none), "linear" (every frequency / factor), "dynamic" (NTK: the base grows once a
/// sequence is longer than max_position_embeddings) and "llama3" (Llama 3.1: low frequencies
/// / factor, high ones kept, a smooth ramp between, set by the original context length).
struct QTUNE_API RopeScaling {
  std::string type = "default";
  double factor = 1.0;
  double low_freq_factor = 1.0;                  // llama3
  double high_freq_factor = 4.0;                 // llama3
  int64_t original_max_position_embeddings = 0;  // llama3: the pre-training context
};

struct QTUNE_API ModelConfig {
  /// HF model_type: "llama", "mistral" or "qwen2" (same tensors; the fields below differ).
  std::string model_type = "llama";
  int64_t hidden_size = 0;        // dim
  int64_t intermediate_size = 0;  // SwiGLU hidden dim
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // grouped-query attention; == heads for MHA
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  /// config.json's explicit head_dim; 0 = hidden_size / num_attention_heads.
  int64_t head_size = 0;
  /// Biases of the projections: q/k/v (qwen2; llama's attention_bias), o (llama's
  /// attention_bias) and gate/up/down (llama's mlp_bias).
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;
  /// Sliding-window attention: a query sees itself and the sliding_window - 1 keys before it
  /// (0 = full causal attention). `sliding_layers` says which layers use it (qwen2's
  /// layer_types); empty means every layer.
  int64_t sliding_window = 0;
  std::vector<bool> sliding_layers;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;

  int64_t head_dim() const { return head_size > 0 ? head_size : hidden_size / num_attention_heads; }
  /// The attention window of decoder layer `layer` (0 = full causal attention).
  int64_t attention_window(int64_t layer) const;
  /// Whether the projection with short name q, k, v, o, gate, up, down or output has a bias.
  bool has_bias(const std::string& short_name) const;
  /// Throws UserError naming the field when a value is inconsistent (heads not dividing, ...).
  void validate(const std::string& origin) const;
  /// Parses an HF config.json of model_type llama, mistral or qwen2; `origin` (a file path) is
  /// named in errors. Keys that would change the function computed but are not implemented
  /// (an unknown model_type or rope type, yarn, partial rotary, another activation ...) are
  /// refused naming the key and the value.
  static ModelConfig from_hf_json(const Json& j, const std::string& origin);
  /// The config.json transformers reads back as the same architecture.
  Json to_hf_json() const;
  /// Number of parameters of the dense model.
  int64_t num_parameters() const;
};

}  // namespace qtune
