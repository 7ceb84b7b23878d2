// Causal grouped-query attention without the [queries, keys] matrix: FlashAttention's algorithm
// (tiles of keys with an online softmax; tiles recomputed in backward) as an autograd function,
// with optional segment ids for packed sequences (block-diagonal causal mask).
#pragma once

#include <torch/torch.h>

#include "qtune/export.h"

namespace qtune {

/// softmax(q k^T / sqrt(D) + mask) v, differentiable in q, k and v.
///
/// q [B, H, T, D]; k, v [B, KV, S, D] with H a multiple of KV: query head h reads key/value head
/// h / (H / KV) (grouped-query attention, as repeat_interleave would pair them). Query i sits at
/// key position `q_offset + i` and sees keys 0 .. q_offset + i (causal; q_offset > 0 continues a
/// KV cache). `segments` (int64 [B, S], only with q_offset = 0 and T = S) further restricts each
/// query to keys of its own segment id: several examples packed in one row do not see each other.
/// Returns [B, H, T, D] in q's dtype; softmax statistics and accumulation are fp32 (fp64 for fp64
/// inputs). Memory beyond the output: O(block^2) per head, not O(T * S). `block` (> 0) is the tile
/// edge in positions; results do not depend on it beyond rounding.
QTUNE_API torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k,
                                         const torch::Tensor& v,
                                         const torch::Tensor& segments = {},
                                         int64_t q_offset = 0, int64_t block = 128);

}  // namespace qtune
