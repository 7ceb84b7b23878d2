// HQQ codec: options, bit packing and the group quantizer with HQQ's half-quadratic zero-point
// solver (layout and conventions in hqq_codec.h).
#include "hqq_codec.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "qtune/error.h"

namespace qtune::hqq {
namespace {
// Storage limits of the per-group scale and zero. A zero-point is kept within ±kZeroLimit codes
// (fp16 resolves 1 code there; fp32 resolves 1/8) by widening the scale of groups that sit far
// from 0 relative to their width; a group straddling 0 always has |zero| <= 2^nbits - 1 and is
// never affected. kMinScale is the smallest scale the storage type holds.
double zero_limit(torch::ScalarType t) { return t == torch::kFloat16 ? 2048.0 : 1048576.0; }
double min_scale(torch::ScalarType t) {
  return t == torch::kFloat16 ? std::ldexp(1.0, -24) : std::ldexp(1.0, -126);
}

// Rounds positive values to the storage type, upwards when `up` (a scale rounded up keeps the
// group's whole range inside the code grid; rounded down the extreme values would be clipped).
MetaStore store_plain(const torch::Tensor& v, torch::ScalarType type, bool up) {
  MetaStore m;
  if (type == torch::kFloat32) {
    m.plain = v.clone();
    m.decoded = v;
    return m;
  }
  torch::Tensor h = v.to(torch::kFloat16);
  if (up) {
    // For positive halves the next representable value is the next bit pattern.
    const torch::Tensor bump = h.to(torch::kFloat32) < v;
    h = torch::where(bump, (h.view(torch::kInt16) + 1).view(torch::kFloat16), h);
  }
  m.plain = h;
  m.decoded = h.to(torch::kFloat32);
  return m;
}

// 8-bit min/max affine quantization of a per-group vector in blocks of kMetaGroup values (hqq's
// quant_scale / quant_zero: nbits 8, group_size 128, no optimization). Scales are rounded up
// (see store_plain); zeros to nearest.
MetaStore store_q8(const torch::Tensor& v, bool up) {
  const int64_t n = v.numel(), nb = ceil_div(n, kMetaGroup);
  torch::Tensor vp = v;
  if (nb * kMetaGroup != n)  // replicate the last value: it cannot widen the block's range
    vp = torch::cat({v, v.slice(0, n - 1, n).expand({nb * kMetaGroup - n})});
  vp = vp.view({nb, kMetaGroup});
  const torch::Tensor lo = vp.amin(1), hi = vp.amax(1);
  // The scale's floor keeps |zero| <= 2^16 so the fp32 decode (q - zero) * scale stays exact to
  // ~1e-7 even for a block of nearly equal values.
  torch::Tensor sb = torch::maximum((hi - lo) / 255.0, torch::maximum(lo.abs(), hi.abs()) / 65536.0)
                         .clamp_min(std::ldexp(1.0, -126));
  torch::Tensor zb = -lo / sb;
  torch::Tensor t = vp / sb.unsqueeze(1) + zb.unsqueeze(1);
  t = (up ? t.ceil() : t.round()).clamp(0, 255);
  MetaStore m;
  m.q = t.to(torch::kUInt8).view(-1).slice(0, 0, n).contiguous();
  m.scale = sb;
  m.zero = zb;
  m.decoded = ((t.view(-1).slice(0, 0, n) - zb.repeat_interleave(kMetaGroup).slice(0, 0, n)) *
               sb.repeat_interleave(kMetaGroup).slice(0, 0, n))
                  .contiguous();
  return m;
}

// hqq's shrink_lp_op: the proximal operator of the l_p "norm" (p < 1) used on the residual.
torch::Tensor shrink_lp(const torch::Tensor& x, double beta, double p) {
  const torch::Tensor a = x.abs();
  // |x|^(p-1) is +inf at 0, so the relu yields 0 there (no NaN).
  return x.sign() * (a - a.pow(p - 1.0) / beta).relu_();
}

// The zero-point solver of hqq's optimize_weights_proximal_legacy (optimize.py): with the scale
// fixed, alternate W_q = round(W*inv + z), W_r = (W_q - z)*s, W_e = shrink_lp(W - W_r), and
// z = mean over the group of (W_q - (W - W_e)*inv), multiplying beta by kappa every step.
// Differences from hqq, all deliberate:
// - hqq stops the whole tensor when its mean |W - W_r| stops decreasing and returns the zero
//   computed after the failing step. We judge each group alone by its squared error (the
//   Frobenius error qtune reports), evaluated with the zero rounded as it will be stored, stop
//   a group at its first non-improving step, and return each group's best zero. A group's error
//   therefore never exceeds its min/max error, and the result does not depend on how groups are
//   chunked or threaded.
torch::Tensor solve_zero(const torch::Tensor& x, const torch::Tensor& s, const torch::Tensor& inv,
                         const torch::Tensor& z0, const HqqParams& p) {
  const int maxq = p.max_code();
  const auto type = p.meta_scalar_type();
  auto stored = [&](const torch::Tensor& z) { return z.to(type).to(torch::kFloat32); };

  // The working set: groups still improving. Stopped groups are dropped once they are half of
  // it, so late iterations only touch the groups that still move.
  torch::Tensor best_z = stored(z0);  // [c], written back when the working set shrinks
  torch::Tensor rows = torch::arange(x.size(0), x.options().dtype(torch::kLong));
  torch::Tensor xa = x, sa = s, inva = inv, za = z0, bza = best_z;
  torch::Tensor ea = group_sq_error(x, s, inv, best_z, maxq);
  torch::Tensor active = torch::ones_like(ea, torch::kBool);
  double beta = p.beta;
  for (int it = 0; it < p.iterations; ++it) {
    const torch::Tensor z2 = za.unsqueeze(1), s2 = sa.unsqueeze(1), inv2 = inva.unsqueeze(1);
    const torch::Tensor q = (xa * inv2 + z2).round_().clamp_(0, maxq);
    const torch::Tensor e = shrink_lp(xa - (q - z2) * s2, beta, p.lp_norm);
    const torch::Tensor z_new = (q - (xa - e) * inv2).mean(1);
    beta *= p.kappa;

    const torch::Tensor zc = stored(z_new);
    const torch::Tensor err = group_sq_error(xa, sa, inva, zc, maxq);
    active = active & (err < ea);
    bza = torch::where(active, zc, bza);
    ea = torch::where(active, err, ea);
    za = z_new;
    const int64_t n_active = active.sum().item<int64_t>();
    if (n_active == 0) break;
    if (2 * n_active < active.numel()) {
      best_z.index_copy_(0, rows, bza);
      const torch::Tensor keep = active.nonzero().squeeze(1);
      rows = rows.index_select(0, keep);
      xa = xa.index_select(0, keep);
      sa = sa.index_select(0, keep);
      inva = inva.index_select(0, keep);
      za = za.index_select(0, keep);
      bza = bza.index_select(0, keep);
      ea = ea.index_select(0, keep);
      active = active.index_select(0, keep);
    }
  }
  best_z.index_copy_(0, rows, bza);
  return best_z;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Options

std::vector<OptionSpec> option_schema() {
  // The ranges are declared here (resolve_options enforces them); nothing else needs checking.
  return {
      {"nbits", 4, "bits per weight", nullptr, nullptr, {2, 3, 4, 8}},
      {"group_size", 64,
       "weights sharing one scale and zero-point (0 = a whole row for axis 1, a whole column for "
       "axis 0), else up to 16384 (larger groups of min/max codes lose heavy-tailed weights: "
       "relative error above 1 at 65536); any shape is accepted (the last group is padded)",
       0, int64_t{1} << 14},
      {"axis",
       1,
       "hqq grouping axis: 1 = groups of consecutive elements of the row-major weight, 0 = groups "
       "strided across rows (columns of W.reshape(group_size, -1))",
       nullptr,
       nullptr,
       {0, 1}},
      {"optimize", true, "refine zero-points with HQQ's half-quadratic proximal solver"},
      {"iterations", 20, "maximum solver iterations", 1, 1000},
      {"quant_scale", false, "store scales as 8-bit codes (per 128 groups) instead of meta_dtype"},
      {"quant_zero", false, "store zero-points as 8-bit codes (per 128 groups)"},
      {"meta_dtype",
       "fp16",
       "storage of scales and zero-points",
       nullptr,
       nullptr,
       {"fp16", "fp32"}},
  };
}

Json HqqParams::to_json() const {
  return Json{{"nbits", nbits},           {"group_size", group_size}, {"axis", axis},
              {"optimize", optimize},     {"iterations", iterations}, {"quant_scale", quant_scale},
              {"quant_zero", quant_zero}, {"meta_dtype", meta_dtype}};
}

HqqParams parse_params(const Json& options, const std::string& context) {
  const Json o = resolve_options(option_schema(), options, context);
  HqqParams p;
  p.nbits = o["nbits"].get<int>();
  p.group_size = o["group_size"].get<int64_t>();
  p.axis = o["axis"].get<int>();
  p.optimize = o["optimize"].get<bool>();
  p.iterations = o["iterations"].get<int>();
  p.quant_scale = o["quant_scale"].get<bool>();
  p.quant_zero = o["quant_zero"].get<bool>();
  p.meta_dtype = o["meta_dtype"].get<std::string>();
  return p;
}

// ---------------------------------------------------------------------------------------------
// Bit packing

PackBlock pack_block(int nbits) {
  switch (nbits) {
    case 8:
      return {1, 1};
    case 4:
      return {2, 1};
    case 2:
      return {4, 1};
    case 3:
      return {8, 3};
  }
  TORCH_CHECK(false, "hqq: unsupported nbits ", nbits);
}

int64_t packed_bytes(int64_t count, int nbits) {
  const PackBlock b = pack_block(nbits);
  return ceil_div(count, b.codes) * b.bytes;
}

torch::Tensor pack_codes(const torch::Tensor& codes, int nbits) {
  const PackBlock blk = pack_block(nbits);
  torch::Tensor c = codes.reshape(-1).to(torch::kUInt8);
  const int64_t n = c.numel(), nb = ceil_div(n, blk.codes);
  if (nb * blk.codes != n) c = torch::cat({c, torch::zeros({nb * blk.codes - n}, c.options())});
  using torch::bitwise_left_shift;
  switch (nbits) {
    case 8:
      return c.contiguous();
    case 4: {
      const torch::Tensor v = c.view({nb, 2});
      return v.select(1, 0) | bitwise_left_shift(v.select(1, 1), 4);
    }
    case 2: {
      const torch::Tensor v = c.view({nb, 4});
      return v.select(1, 0) | bitwise_left_shift(v.select(1, 1), 2) |
             bitwise_left_shift(v.select(1, 2), 4) | bitwise_left_shift(v.select(1, 3), 6);
    }
    default: {  // 3: eight codes -> one 24-bit little-endian word -> three bytes
      const torch::Tensor v = c.view({nb, 8}).to(torch::kInt32);
      torch::Tensor word = v.select(1, 0).clone();
      for (int i = 1; i < 8; ++i) word.bitwise_or_(bitwise_left_shift(v.select(1, i), 3 * i));
      return torch::stack(
                 {word.bitwise_and(255), torch::bitwise_right_shift(word, 8).bitwise_and(255),
                  torch::bitwise_right_shift(word, 16)},
                 1)
          .to(torch::kUInt8)
          .view(-1);
    }
  }
}

torch::Tensor unpack_codes(const torch::Tensor& packed, int nbits, int64_t begin, int64_t end) {
  const PackBlock blk = pack_block(nbits);
  const int64_t b0 = begin / blk.codes, b1 = ceil_div(end, blk.codes);
  TORCH_CHECK(0 <= begin && begin <= end && b1 * blk.bytes <= packed.numel(), "hqq: code range [",
              begin, ", ", end, ") outside a stream of ", packed.numel(), " bytes");
  const torch::Tensor b = packed.slice(0, b0 * blk.bytes, b1 * blk.bytes);
  using torch::bitwise_right_shift;
  torch::Tensor codes;
  switch (nbits) {
    case 8:
      codes = b;
      break;
    case 4:
      codes = torch::stack({b.bitwise_and(15), bitwise_right_shift(b, 4)}, 1).view(-1);
      break;
    case 2:
      codes = torch::stack({b.bitwise_and(3), bitwise_right_shift(b, 2).bitwise_and_(3),
                            bitwise_right_shift(b, 4).bitwise_and_(3), bitwise_right_shift(b, 6)},
                           1)
                  .view(-1);
      break;
    default: {  // 3
      const torch::Tensor v = b.view({b1 - b0, 3}).to(torch::kInt32);
      const torch::Tensor word = v.select(1, 0) | torch::bitwise_left_shift(v.select(1, 1), 8) |
                                 torch::bitwise_left_shift(v.select(1, 2), 16);
      std::vector<torch::Tensor> parts;
      parts.reserve(8);
      for (int i = 0; i < 8; ++i) parts.push_back(bitwise_right_shift(word, 3 * i).bitwise_and_(7));
      codes = torch::stack(parts, 1).to(torch::kUInt8).view(-1);
    }
  }
  return codes.slice(0, begin - b0 * blk.codes, end - b0 * blk.codes);
}

// ---------------------------------------------------------------------------------------------
// Group quantizer

torch::Tensor group_sq_error(const torch::Tensor& x, const torch::Tensor& s,
                             const torch::Tensor& inv, const torch::Tensor& z, int max_code) {
  const torch::Tensor z2 = z.unsqueeze(1);
  const torch::Tensor q = (x * inv.unsqueeze(1) + z2).round_().clamp_(0, max_code);
  return (q - z2).mul_(s.unsqueeze(1)).sub_(x).square_().sum(1);
}

GroupQuant quantize_groups(const torch::Tensor& x, const HqqParams& p) {
  const int maxq = p.max_code();
  const auto type = p.meta_scalar_type();
  // hqq's min/max initialisation (Quantizer.quantize): inv = max_v / (max - min),
  // zero = -min * inv. Our scale is 1/inv, floored so that |zero| <= zero_limit and the scale
  // is representable (a constant group gets a tiny scale and reconstructs exactly).
  const torch::Tensor mn = x.amin(1), mx = x.amax(1);
  const torch::Tensor s =
      torch::maximum((mx - mn) / maxq, mn.abs() / zero_limit(type)).clamp_min(min_scale(type));
  GroupQuant out;
  out.scale = p.quant_scale ? store_q8(s, /*up=*/true) : store_plain(s, type, /*up=*/true);
  QTUNE_CHECK(torch::isfinite(out.scale.decoded).all().item<bool>(),
              "hqq: a group's scale exceeds the fp16 range (weights above ~1e6 in magnitude); set "
              "quant.options.meta_dtype to \"fp32\"");
  const torch::Tensor inv = out.scale.decoded.reciprocal();
  const torch::Tensor z0 = -mn * inv;
  const torch::Tensor z = p.optimize ? solve_zero(x, out.scale.decoded, inv, z0, p) : z0;
  out.zero = p.quant_zero ? store_q8(z, /*up=*/false) : store_plain(z, type, /*up=*/false);
  out.codes = (x * inv.unsqueeze(1) + out.zero.decoded.unsqueeze(1))
                  .round_()
                  .clamp_(0, maxq)
                  .to(torch::kUInt8);
  return out;
}

}  // namespace qtune::hqq
