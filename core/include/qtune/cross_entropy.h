// Cross-entropy over a large vocabulary without the full [tokens, vocab] logits: the output head
// and the loss run a chunk of tokens at a time, and each chunk's logits are recomputed in
// backward instead of kept.
#pragma once

#include <functional>
#include <vector>

#include <torch/torch.h>

#include "qtune/export.h"

namespace qtune {

/// Maps hidden states [n, dim] to logits [n, vocab] (an output head).
using HeadFn = std::function<torch::Tensor(const torch::Tensor& hidden)>;

/// Mean cross-entropy of head(hidden) against `targets` over the targets != `ignore_index`, with
/// the value and gradients of torch's cross_entropy(head(hidden), targets) within rounding (NaN
/// when no target counts, as there). hidden [N, dim] any float dtype; targets [N] int64; the
/// logits are promoted to `logits_dtype` before the softmax, and so is the result (a scalar).
/// Only counted rows reach the head. When more than `chunk_tokens` (> 0) of them do, they go
/// through the head `chunk_tokens` at a time, each chunk as a recomputed node
/// (recompute_in_backward; `params` are the trainable tensors head reads), so at most one
/// chunk's logits and their gradient exist at once, in forward and in backward.
QTUNE_API torch::Tensor chunked_cross_entropy(const torch::Tensor& hidden,
                                              const torch::Tensor& targets, const HeadFn& head,
                                              const std::vector<torch::Tensor>& params,
                                              int64_t chunk_tokens,
                                              torch::ScalarType logits_dtype,
                                              int64_t ignore_index = -100);

}  // namespace qtune
