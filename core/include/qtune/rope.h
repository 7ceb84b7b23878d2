// Rotary position embeddings: the inverse frequencies a ModelConfig implies (its rope_theta and
// rope_scaling), the same numbers transformers' modeling_rope_utils computes.
#pragma once

#include <torch/torch.h>

#include <cstdint>

#include "qtune/export.h"
#include "qtune/model_config.h"

namespace qtune {

/// Inverse frequencies [head_dim / 2], fp64 on the CPU, for a forward pass whose positions are
/// all < `seq_len`. Only the "dynamic" type depends on `seq_len` (its base grows once seq_len
/// exceeds max_position_embeddings); transformers keeps the largest length seen so far instead,
/// which gives the same numbers for one forward pass over a whole sequence.
QTUNE_API torch::Tensor rope_inv_freq(const ModelConfig& config, int64_t seq_len);

/// True when rope_inv_freq depends on the sequence length (dynamic NTK scaling).
QTUNE_API bool rope_depends_on_length(const ModelConfig& config);

}  // namespace qtune
