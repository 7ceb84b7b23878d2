// Llama-family architecture hyper-parameters, read from and written to Hugging Face config.json.
#pragma once

#include <cstdint>
#include <string>

#include "qtune/export.h"
#include "qtune/options.h"

namespace qtune {

struct QTUNE_API ModelConfig {
  int64_t hidden_size = 0;             // dim
  int64_t intermediate_size = 0;       // SwiGLU hidden dim
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;     // grouped-query attention; == heads for MHA
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  /// Throws UserError naming the field when a value is inconsistent (heads not dividing, ...).
  void validate(const std::string& origin) const;
  /// Parses an HF LlamaConfig JSON; `origin` (a file path) is named in errors.
  static ModelConfig from_hf_json(const Json& j, const std::string& origin);
  Json to_hf_json() const;
  /// Number of parameters of the dense model.
  int64_t num_parameters() const;
};

}  // namespace qtune
