// Chunked cross-entropy (see cross_entropy.h).
#include "qtune/cross_entropy.h"

#include "qtune/error.h"
#include "qtune/recompute.h"

namespace F = torch::nn::functional;

namespace qtune {

torch::Tensor chunked_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& targets,
                                    const HeadFn& head, const std::vector<torch::Tensor>& params,
                                    int64_t chunk_tokens, torch::ScalarType logits_dtype,
                                    int64_t ignore_index) {
  QTUNE_CHECK(hidden.dim() == 2 && targets.dim() == 1 && targets.size(0) == hidden.size(0),
              "cross_entropy: hidden must be [tokens, dim] and targets [tokens], got ",
              hidden.sizes(), " and ", targets.sizes());
  QTUNE_CHECK(chunk_tokens > 0, "cross_entropy: chunk_tokens must be > 0, got ", chunk_tokens);
  // Rows whose target is ignored contribute nothing: they never reach the head (with
  // response-only loss that is most of a prompt's tokens).
  auto h = hidden;
  auto t = targets;
  const auto keep = targets.ne(ignore_index);
  const int64_t count = keep.sum().item<int64_t>();
  if (count < targets.size(0)) {
    auto rows = keep.nonzero().squeeze(1);
    h = hidden.index_select(0, rows);
    t = targets.index_select(0, rows);
  }
  // By value: the chunks' copies run again in backward, after the caller's head is gone.
  auto sum_loss = [head, logits_dtype, ignore_index](const torch::Tensor& x,
                                                     const torch::Tensor& y) {
    return F::cross_entropy(head(x).to(logits_dtype), y,
                            F::CrossEntropyFuncOptions().ignore_index(ignore_index).reduction(
                                torch::kSum));
  };
  if (count <= chunk_tokens) {
    // One chunk (or none: the empty sum over zero counted targets is 0 / 0 = NaN, as torch's).
    return sum_loss(h, t) / static_cast<double>(count);
  }
  torch::Tensor total;
  for (int64_t start = 0; start < count; start += chunk_tokens) {
    const int64_t n = std::min(chunk_tokens, count - start);
    auto y = t.narrow(0, start, n);
    auto part = recompute_in_backward(
        [sum_loss, y](const std::vector<torch::Tensor>& in) { return sum_loss(in[0], y); },
        {h.narrow(0, start, n)}, params);
    total = total.defined() ? total + part : part;
  }
  return total / static_cast<double>(count);
}

}  // namespace qtune
