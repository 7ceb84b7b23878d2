// Memory-efficient causal attention (see attention.h). The algorithm is FlashAttention's
// (Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness",
// algorithms 1 and 2; backward as in FlashAttention-2): queries and keys are taken a tile at a
// time, a running maximum and sum turn the per-tile exponentials into the exact softmax, and
// backward recomputes each tile's probabilities from the saved log-sum-exp instead of keeping
// them. Written with tensor ops over [block x block] tiles, so it runs on any device and dtype.
#include "qtune/attention.h"

#include <cmath>
#include <limits>

#include "qtune/error.h"

namespace qtune {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// One problem, viewed so that the G = H / KV query heads that share a key/value head are rows of
// one matrix: q [B, KV, G, T, D] -> rows (g, t) of [B, KV, G*T, D] per tile.
struct Shape {
  int64_t B, H, KV, G, T, S, D;
};

Shape shape_of(const torch::Tensor& q, const torch::Tensor& k) {
  return {q.size(0), q.size(1), k.size(1), q.size(1) / k.size(1), q.size(2), k.size(2), q.size(3)};
}

// Which keys [ks, ks+tk) the queries [qs, qs+tq) may see: undefined = all of them;
// otherwise a bool mask broadcastable to [B, KV, G, tq, tk].
struct TileMask {
  bool empty = false;  // no query of the tile sees any key of it: skip the tile
  torch::Tensor allowed;
};

TileMask tile_mask(const Shape& s, const torch::Tensor& segments, int64_t q_offset, int64_t qs,
                   int64_t tq, int64_t ks, int64_t tk, const torch::Device& device) {
  TileMask m;
  const int64_t first_q = q_offset + qs, last_q = q_offset + qs + tq - 1;
  if (ks > last_q) {
    m.empty = true;
    return m;
  }
  if (ks + tk - 1 > first_q) {  // the tile crosses the diagonal
    const auto opts = torch::TensorOptions().dtype(torch::kLong).device(device);
    auto qi = torch::arange(first_q, last_q + 1, opts).unsqueeze(1);
    auto kj = torch::arange(ks, ks + tk, opts).unsqueeze(0);
    m.allowed = kj <= qi;
  }
  if (segments.defined()) {
    auto sq = segments.narrow(1, qs, tq).to(device).unsqueeze(2);  // [B, tq, 1]
    auto sk = segments.narrow(1, ks, tk).to(device).unsqueeze(1);  // [B, 1, tk]
    auto same = sq == sk;                               // [B, tq, tk]
    m.allowed = m.allowed.defined() ? same & m.allowed : same;
    if (!m.allowed.any().item<bool>()) {
      m.empty = true;
      return m;
    }
    m.allowed = m.allowed.view({s.B, 1, 1, tq, tk});
  }
  return m;
}

torch::ScalarType accum_dtype(const torch::Tensor& q) {
  return torch::promote_types(q.scalar_type(), torch::kFloat32);
}

// Scores of one tile: (q * scale) k^T, masked, as [B, KV, G, tq, tk] in the accumulation dtype.
torch::Tensor tile_scores(const Shape& s, const torch::Tensor& q_tile, const torch::Tensor& k_tile,
                          const TileMask& m, int64_t tq, int64_t tk) {
  auto scores = torch::matmul(q_tile, k_tile.transpose(-2, -1)).view({s.B, s.KV, s.G, tq, tk});
  if (m.allowed.defined()) scores.masked_fill_(m.allowed.logical_not(), -kInf);
  return scores;
}

struct Forward {
  torch::Tensor out;  // [B, KV, G, T, D] accumulation dtype
  torch::Tensor lse;  // [B, KV, G, T] log-sum-exp of each query's scaled scores
};

// q [B, KV, G, T, D], k/v [B, KV, S, D], all contiguous and in the accumulation dtype.
Forward flash_forward(const Shape& s, const torch::Tensor& q, const torch::Tensor& k,
                      const torch::Tensor& v, const torch::Tensor& segments, int64_t q_offset,
                      int64_t block, double scale) {
  Forward f;
  f.out = torch::empty_like(q);
  f.lse = torch::empty({s.B, s.KV, s.G, s.T}, q.options());
  for (int64_t qs = 0; qs < s.T; qs += block) {
    const int64_t tq = std::min(block, s.T - qs);
    auto q_tile = (q.narrow(3, qs, tq) * scale).reshape({s.B, s.KV, s.G * tq, s.D});
    auto m = torch::full({s.B, s.KV, s.G, tq, 1}, -kInf, q.options());  // running max
    auto l = torch::zeros({s.B, s.KV, s.G, tq, 1}, q.options());        // running sum
    auto acc = torch::zeros({s.B, s.KV, s.G * tq, s.D}, q.options());
    for (int64_t ks = 0; ks < s.S; ks += block) {
      const int64_t tk = std::min(block, s.S - ks);
      const TileMask mask = tile_mask(s, segments, q_offset, qs, tq, ks, tk, q.device());
      if (mask.empty) continue;
      auto scores = tile_scores(s, q_tile, k.narrow(2, ks, tk), mask, tq, tk);
      auto m_new = torch::maximum(m, std::get<0>(scores.max(-1, /*keepdim=*/true)));
      // A row that has seen no allowed key yet keeps max -inf; subtract 0 there instead (its
      // exponentials are all 0 either way) so that no inf - inf appears.
      auto m_safe = torch::where(torch::isinf(m_new), torch::zeros_like(m_new), m_new);
      auto p = (scores - m_safe).exp_();
      auto correction = (m - m_safe).exp_();  // rescales what was accumulated so far
      l = l * correction + p.sum(-1, /*keepdim=*/true);
      acc = acc * correction.view({s.B, s.KV, s.G * tq, 1}) +
            torch::matmul(p.view({s.B, s.KV, s.G * tq, tk}), v.narrow(2, ks, tk));
      m = m_new;
    }
    // Every query sees at least itself, so l > 0.
    f.out.narrow(3, qs, tq).copy_(acc.view({s.B, s.KV, s.G, tq, s.D}) / l);
    f.lse.narrow(3, qs, tq).copy_((m + l.log()).squeeze(-1));
  }
  return f;
}

struct Grads {
  torch::Tensor dq, dk, dv;
};

// Same layout as flash_forward; dout [B, KV, G, T, D]. Each tile's probabilities are recomputed
// as exp(scores - lse); dS = P * (dP - rowsum(dO * O)).
Grads flash_backward(const Shape& s, const torch::Tensor& q, const torch::Tensor& k,
                     const torch::Tensor& v, const torch::Tensor& out, const torch::Tensor& lse,
                     const torch::Tensor& dout, const torch::Tensor& segments, int64_t q_offset,
                     int64_t block, double scale) {
  Grads g;
  g.dq = torch::zeros_like(q);
  g.dk = torch::zeros_like(k);
  g.dv = torch::zeros_like(v);
  auto delta = (dout * out).sum(-1, /*keepdim=*/true);  // [B, KV, G, T, 1]
  for (int64_t qs = 0; qs < s.T; qs += block) {
    const int64_t tq = std::min(block, s.T - qs);
    auto q_tile = (q.narrow(3, qs, tq) * scale).reshape({s.B, s.KV, s.G * tq, s.D});
    auto do_tile = dout.narrow(3, qs, tq).reshape({s.B, s.KV, s.G * tq, s.D});
    auto lse_tile = lse.narrow(3, qs, tq).unsqueeze(-1);
    auto delta_tile = delta.narrow(3, qs, tq);
    auto dq_tile = torch::zeros({s.B, s.KV, s.G * tq, s.D}, q.options());
    for (int64_t ks = 0; ks < s.S; ks += block) {
      const int64_t tk = std::min(block, s.S - ks);
      const TileMask mask = tile_mask(s, segments, q_offset, qs, tq, ks, tk, q.device());
      if (mask.empty) continue;
      auto k_tile = k.narrow(2, ks, tk), v_tile = v.narrow(2, ks, tk);
      auto p = (tile_scores(s, q_tile, k_tile, mask, tq, tk) - lse_tile).exp_();
      auto p2 = p.view({s.B, s.KV, s.G * tq, tk});
      // Rows of one kv head's G query heads are summed by the product itself.
      g.dv.narrow(2, ks, tk).add_(torch::matmul(p2.transpose(-2, -1), do_tile));
      auto dp = torch::matmul(do_tile, v_tile.transpose(-2, -1)).view({s.B, s.KV, s.G, tq, tk});
      auto ds = (p * (dp - delta_tile)).view({s.B, s.KV, s.G * tq, tk});
      dq_tile.add_(torch::matmul(ds, k_tile));
      g.dk.narrow(2, ks, tk).add_(torch::matmul(ds.transpose(-2, -1), q_tile));
    }
    g.dq.narrow(3, qs, tq).copy_((dq_tile * scale).view({s.B, s.KV, s.G, tq, s.D}));
  }
  return g;
}

void check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                  const torch::Tensor& segments, int64_t q_offset, int64_t block) {
  QTUNE_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "attention: q, k, v must be [batch, heads, positions, head_dim], got ", q.sizes(),
              ", ", k.sizes(), ", ", v.sizes());
  QTUNE_CHECK(k.sizes() == v.sizes(), "attention: k ", k.sizes(), " and v ", v.sizes(),
              " must have the same shape");
  QTUNE_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3) && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0,
              "attention: q ", q.sizes(), " does not fit k ", k.sizes(),
              " (same batch and head_dim, query heads a multiple of key/value heads)");
  QTUNE_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention: q, k, v must have one dtype");
  QTUNE_CHECK(q_offset >= 0 && q_offset + q.size(2) <= k.size(2), "attention: queries at ",
              q_offset, "..", q_offset + q.size(2), " lie beyond the ", k.size(2), " keys");
  QTUNE_CHECK(block > 0, "attention: block must be > 0, got ", block);
  if (segments.defined()) {
    QTUNE_CHECK(segments.scalar_type() == torch::kLong && segments.dim() == 2 &&
                    segments.size(0) == q.size(0) && segments.size(1) == k.size(2),
                "attention: segments must be int64 [", q.size(0), ", ", k.size(2), "], got ",
                segments.scalar_type(), " ", segments.sizes());
    QTUNE_CHECK(q_offset == 0 && q.size(2) == k.size(2),
                "attention: segments need queries and keys at the same positions");
  }
}

struct FlashAttentionFunction : public torch::autograd::Function<FlashAttentionFunction> {
  // segments travel as an optional: an undefined tensor is not a valid autograd input.
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q,
                               const torch::Tensor& k, const torch::Tensor& v,
                               const c10::optional<torch::Tensor>& segments_opt, int64_t q_offset,
                               int64_t block) {
    const torch::Tensor segments = segments_opt.has_value() ? *segments_opt : torch::Tensor();
    const Shape s = shape_of(q, k);
    const auto dt = accum_dtype(q);
    const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
    auto q5 = q.to(dt).reshape({s.B, s.KV, s.G, s.T, s.D}).contiguous();
    auto k4 = k.to(dt).contiguous(), v4 = v.to(dt).contiguous();
    Forward f = flash_forward(s, q5, k4, v4, segments, q_offset, block, scale);
    // Inputs in their own dtype, the output and log-sum-exp in the accumulation dtype: what
    // backward needs, O(T) per head beyond the inputs.
    ctx->save_for_backward({q, k, v, f.out, f.lse, segments});
    ctx->saved_data["q_offset"] = q_offset;
    ctx->saved_data["block"] = block;
    // A copy even in the accumulation dtype: the output must not alias what is saved.
    return f.out.view({s.B, s.H, s.T, s.D}).to(q.scalar_type(), /*non_blocking=*/false,
                                                 /*copy=*/true);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2];
    const Shape s = shape_of(q, k);
    const auto dt = accum_dtype(q);
    const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
    auto q5 = q.to(dt).reshape({s.B, s.KV, s.G, s.T, s.D}).contiguous();
    auto dout = grad_out[0].to(dt).reshape({s.B, s.KV, s.G, s.T, s.D}).contiguous();
    Grads g = flash_backward(s, q5, k.to(dt).contiguous(), v.to(dt).contiguous(), saved[3],
                             saved[4], dout, saved[5], ctx->saved_data["q_offset"].toInt(),
                             ctx->saved_data["block"].toInt(), scale);
    return {g.dq.view({s.B, s.H, s.T, s.D}).to(q.scalar_type()), g.dk.to(k.scalar_type()),
            g.dv.to(v.scalar_type()), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& segments,
                               int64_t q_offset, int64_t block) {
  check_inputs(q, k, v, segments, q_offset, block);
#if TORCH_VERSION_MAJOR >= 2
  // LibTorch's fused kernel computes the same function where its causal mask is ours: no
  // segments and queries at the keys' positions (its is_causal aligns the mask top-left). It is
  // memory-efficient on CUDA from 2.0 and on the CPU from 2.1 (pytorch/pytorch#103826).
  const bool fused_here =
      q.is_cuda() || TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 1;
  if (fused_here && !segments.defined() && q_offset == 0 && q.size(2) == k.size(2)) {
    auto kk = k, vv = v;
    if (k.size(1) != q.size(1)) {
      kk = k.repeat_interleave(q.size(1) / k.size(1), 1);
      vv = v.repeat_interleave(q.size(1) / k.size(1), 1);
    }
    return at::scaled_dot_product_attention(q, kk, vv, {}, 0.0, /*is_causal=*/true);
  }
#endif
  const bool needs_grad =
      torch::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  if (!needs_grad) {
    // Inference (evaluation, generation): the same forward, without an autograd node.
    const Shape s = shape_of(q, k);
    const auto dt = accum_dtype(q);
    const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
    auto q5 = q.to(dt).reshape({s.B, s.KV, s.G, s.T, s.D}).contiguous();
    auto k4 = k.to(dt).contiguous(), v4 = v.to(dt).contiguous();
    if (s.T <= block) {
      // At most a tile of queries (a decoding step against a long cache): [T, S] is small, and
      // one plain softmax over all keys avoids the per-tile work that would dominate the step.
      const TileMask mask = tile_mask(s, segments, q_offset, 0, s.T, 0, s.S, q.device());
      auto p = torch::softmax(
          tile_scores(s, (q5 * scale).view({s.B, s.KV, s.G * s.T, s.D}), k4, mask, s.T, s.S), -1);
      return torch::matmul(p.view({s.B, s.KV, s.G * s.T, s.S}), v4)
          .view({s.B, s.H, s.T, s.D})
          .to(q.scalar_type());
    }
    auto f = flash_forward(s, q5, k4, v4, segments, q_offset, block, scale);
    return f.out.view({s.B, s.H, s.T, s.D}).to(q.scalar_type());
  }
  c10::optional<torch::Tensor> seg;
  if (segments.defined()) seg = segments;
  return FlashAttentionFunction::apply(q, k, v, seg, q_offset, block);
}

}  // namespace qtune
