// HQQ backend: options, bit packing, the half-quadratic zero-point solver, the quantized weight
// and the plugin entry point. Layout and conventions are documented in hqq.h.
#include "hqq.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "qtune/error.h"
#include "qtune/plugin.h"
#include "qtune/simd.h"

namespace qtune::hqq {
namespace {

constexpr int kFormatVersion = 1;
// Elements of W handled per solver chunk (about 1 MB of fp32 per temporary): bounds the solver's
// memory whatever the matrix size, and is the unit of CPU parallelism.
constexpr int64_t kChunkElems = int64_t{1} << 18;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

void check_range(bool ok, const std::string& context, const char* key, const Json& value,
                 const char* allowed) {
  QTUNE_CHECK(ok, context, ".", key, " must be ", allowed, ", got ", value.dump());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Options

std::vector<OptionSpec> option_schema() {
  return {
      {"nbits", 4, "bits per weight: 2, 3, 4 or 8"},
      {"group_size", 64,
       "weights sharing one scale and zero-point (0 = a whole row for axis 1, a whole column for "
       "axis 0); any shape is accepted (the last group is padded)"},
      {"axis", 1,
       "hqq grouping axis: 1 = groups of consecutive elements of the row-major weight, 0 = groups "
       "strided across rows (columns of W.reshape(group_size, -1))"},
      {"optimize", true, "refine zero-points with HQQ's half-quadratic proximal solver"},
      {"iterations", 20, "maximum solver iterations (1..1000)"},
      {"quant_scale", false, "store scales as 8-bit codes (per 128 groups) instead of meta_dtype"},
      {"quant_zero", false, "store zero-points as 8-bit codes (per 128 groups)"},
      {"meta_dtype", "fp16", "storage of scales and zero-points: fp16 or fp32"},
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
  const Json& nbits = o["nbits"];
  check_range(nbits == 2 || nbits == 3 || nbits == 4 || nbits == 8, context, "nbits", nbits,
              "one of 2, 3, 4, 8");
  p.nbits = nbits.get<int>();
  const Json& group = o["group_size"];
  check_range(group.get<int64_t>() >= 0 && group.get<int64_t>() <= (int64_t{1} << 30), context,
              "group_size", group, "0 (whole row/column) or a positive integer <= 2^30");
  p.group_size = group.get<int64_t>();
  const Json& axis = o["axis"];
  check_range(axis == 0 || axis == 1, context, "axis", axis, "one of 0, 1");
  p.axis = axis.get<int>();
  p.optimize = o["optimize"].get<bool>();
  const Json& iters = o["iterations"];
  check_range(iters.get<int64_t>() >= 1 && iters.get<int64_t>() <= 1000, context, "iterations",
              iters, "an integer in 1..1000");
  p.iterations = iters.get<int>();
  p.quant_scale = o["quant_scale"].get<bool>();
  p.quant_zero = o["quant_zero"].get<bool>();
  const Json& md = o["meta_dtype"];
  check_range(md == "fp16" || md == "fp32", context, "meta_dtype", md, "one of \"fp16\", \"fp32\"");
  p.meta_dtype = md.get<std::string>();
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

// ---------------------------------------------------------------------------------------------
// HqqWeight

namespace {

// The tensor keys of a weight with these options, with dtypes, sizes given G groups and Np
// padded elements.
struct KeySpec {
  std::string key;
  torch::ScalarType dtype;
  int64_t size;
};

std::vector<KeySpec> key_specs(const HqqParams& p, int64_t groups, int64_t padded) {
  std::vector<KeySpec> keys{{"W_q", torch::kUInt8, packed_bytes(padded, p.nbits)}};
  const int64_t nb = ceil_div(groups, kMetaGroup);
  for (const std::string name : {"scale", "zero"}) {
    const bool q = name == "scale" ? p.quant_scale : p.quant_zero;
    if (q) {
      keys.push_back({name + "_q", torch::kUInt8, groups});
      keys.push_back({name + "_q.scale", torch::kFloat32, nb});
      keys.push_back({name + "_q.zero", torch::kFloat32, nb});
    } else {
      keys.push_back({name, p.meta_scalar_type(), groups});
    }
  }
  return keys;
}

}  // namespace

HqqWeight::HqqWeight(int64_t out, int64_t in, HqqParams params,
                     std::map<std::string, torch::Tensor> t)
    : out_(out), in_(in), params_(std::move(params)), tensors_(std::move(t)) {
  group_ = params_.effective_group(out_, in_);
  groups_ = ceil_div(out_ * in_, group_);
}

torch::Tensor HqqWeight::decode_meta(const std::string& key, int64_t k0, int64_t k1) const {
  auto it = tensors_.find(key);
  if (it != tensors_.end()) return it->second.slice(0, k0, k1).to(torch::kFloat32);
  const int64_t b0 = k0 / kMetaGroup, b1 = ceil_div(k1, kMetaGroup);
  const int64_t off = k0 - b0 * kMetaGroup;
  auto expand = [&](const torch::Tensor& t) {
    return t.slice(0, b0, b1).repeat_interleave(kMetaGroup).slice(0, off, off + (k1 - k0));
  };
  // Same fp32 expression as store_q8, so the decoded values are bit-identical.
  return (tensors_.at(key + "_q").slice(0, k0, k1).to(torch::kFloat32) -
          expand(tensors_.at(key + "_q.zero"))) *
         expand(tensors_.at(key + "_q.scale"));
}

std::pair<torch::Tensor, torch::Tensor> HqqWeight::group_params(int64_t k0, int64_t k1) const {
  return {decode_meta("scale", k0, k1), decode_meta("zero", k0, k1)};
}

torch::Tensor HqqWeight::dequantize_flat(int64_t f0, int64_t f1) const {
  const torch::Tensor& wq = tensors_.at("W_q");
  const int nbits = params_.nbits;
  if (params_.axis == 1) {
    // Widen to whole groups (the padded stream always holds them), dequantize as [groups, g].
    const int64_t k0 = f0 / group_, k1 = ceil_div(f1, group_);
    torch::Tensor w = unpack_codes(wq, nbits, k0 * group_, k1 * group_)
                          .to(torch::kFloat32)
                          .view({k1 - k0, group_});
    auto [s, z] = group_params(k0, k1);
    w.sub_(z.unsqueeze(1)).mul_(s.unsqueeze(1));
    return w.view(-1).slice(0, f0 - k0 * group_, f1 - k0 * group_);
  }
  // axis 0: flat element f belongs to group f % G. Split [f0, f1) at multiples of G: whole
  // stretches of G broadcast the full scale/zero vectors, the partial ends slice them.
  const int64_t G = groups_;
  auto [s, z] = group_params(0, G);
  std::vector<torch::Tensor> parts;
  int64_t f = f0;
  auto partial = [&](int64_t a, int64_t b) {
    const int64_t c = a % G;
    parts.push_back(unpack_codes(wq, nbits, a, b)
                        .to(torch::kFloat32)
                        .sub_(z.slice(0, c, c + (b - a)))
                        .mul_(s.slice(0, c, c + (b - a))));
  };
  if (f % G != 0) {
    const int64_t e = std::min(f1, (f / G + 1) * G);
    partial(f, e);
    f = e;
  }
  const int64_t full = (f1 - f) / G;
  if (full > 0) {
    parts.push_back(unpack_codes(wq, nbits, f, f + full * G)
                        .to(torch::kFloat32)
                        .view({full, G})
                        .sub_(z.unsqueeze(0))
                        .mul_(s.unsqueeze(0))
                        .view(-1));
    f += full * G;
  }
  if (f < f1) partial(f, f1);
  return parts.size() == 1 ? parts[0] : torch::cat(parts);
}

namespace {

// CPU kernel for the axis-1 layout: groups are contiguous runs of the flat stream, so each group
// is one (scale, zero) pair and a run of codes. For 2/3/4 bits the group's 2^nbits dequantized
// values are tabulated first ((c - zero) * scale, the very fp32 expression of the tensor-op
// path, so both paths agree bit for bit) and the codes index the table.
// fp32 -> T. For bf16 this is c10's round-to-nearest-even without its NaN branch (the values
// are finite), so it matches Tensor::to(kBFloat16) bit for bit.
template <typename T>
inline T convert(float v) {
  return v;
}
template <>
inline c10::BFloat16 convert<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

#ifdef QTUNE_SIMD_X86
// AVX-512 for 4-bit codes: the group's 16-entry table sits in one register and vpermps looks
// codes up 16 at a time; vpermt2ps puts low/high nibbles back in element order (low first).
// Lookups return the table's fp32 values unchanged, so the results equal the scalar loop's.
__attribute__((target("avx512f"))) inline void lookup32_avx512(const uint8_t* src, __m512 table,
                                                               __m512* o0, __m512* o1) {
  const __m512i bytes = simd::load_bytes16_avx512(src);
  const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), table);
  const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
  simd::interleave_avx512(lo, hi, o0, o1);  // low nibble first
}

// The group's table (c - zero) * scale for c = 0..15 in one register: the scalar expression lane
// by lane, so lookups return exactly the scalar loop's values.
__attribute__((target("avx512f"))) inline __m512 group_table_avx512(float zk, float sk) {
  alignas(64) static const float kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return _mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(kIota), _mm512_set1_ps(zk)),
                       _mm512_set1_ps(sk));
}

// One group's 4-bit codes, elements [e0, e1) of the flat stream, written to `o`. The register
// table is stored once for the odd element at either end.
template <typename T>
__attribute__((target("avx512f"))) void group4_avx512(const uint8_t* packed, int64_t e0, int64_t e1,
                                                      float zk, float sk, T* o) {
  const __m512 t = group_table_avx512(zk, sk);
  alignas(64) float table[16];
  _mm512_store_ps(table, t);
  int64_t f = e0;
  if (f < e1 && (f & 1)) *o++ = convert<T>(table[packed[f++ >> 1] >> 4]);
  for (; f + 32 <= e1; f += 32, o += 32) {
    __m512 o0, o1;
    lookup32_avx512(packed + (f >> 1), t, &o0, &o1);
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(o, o0);
      _mm512_storeu_ps(o + 16, o1);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), simd::bf16_avx512(o0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), simd::bf16_avx512(o1));
    }
  }
  for (; f < e1; ++f) *o++ = convert<T>(table[(packed[f >> 1] >> ((f & 1) * 4)) & 15]);
}

// 8-bit codes: (q - zero) * scale, 16 at a time, the scalar loop's two roundings exactly.
__attribute__((target("avx512f"))) inline __m512 affine16_avx512(const uint8_t* src, __m512 z,
                                                                 __m512 s) {
  const __m512 q = _mm512_cvtepi32_ps(simd::load_bytes16_avx512(src));
  return _mm512_mul_ps(_mm512_sub_ps(q, z), s);
}
__attribute__((target("avx512f"))) void affine8_avx512(const uint8_t* src, int64_t n, float z,
                                                       float s, float* dst) {
  const __m512 vz = _mm512_set1_ps(z), vs = _mm512_set1_ps(s);
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(dst + i, affine16_avx512(src + i, vz, vs));
}
__attribute__((target("avx512f"))) void affine8_avx512(const uint8_t* src, int64_t n, float z,
                                                       float s, c10::BFloat16* dst) {
  const __m512 vz = _mm512_set1_ps(z), vs = _mm512_set1_ps(s);
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        simd::bf16_avx512(affine16_avx512(src + i, vz, vs)));
}
#endif

// Code f of a 2- or 3-bit stream (3-bit: 8 codes per little-endian 24-bit word).
inline uint32_t small_code(const uint8_t* packed, int nbits, int64_t f) {
  if (nbits == 2) return (packed[f >> 2] >> ((f & 3) * 2)) & 3;
  const uint8_t* p = packed + 3 * (f >> 3);
  const uint32_t w = static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
                     static_cast<uint32_t>(p[2]) << 16;
  return (w >> (3 * (f & 7))) & 7;
}

#ifdef QTUNE_SIMD_X86
// One group of 2- or 3-bit codes: 16 codes (4 or 6 bytes) per step are spread over 16 lanes
// (lane l takes the byte(s) holding code l, then its shift), then looked up in the register
// table as for 4 bits. Steps start at a multiple of 8 codes and read 16 bytes, so the ends of
// the group and of the stream (`nbytes`) go code by code.
template <typename T>
__attribute__((target("avx512f"))) void group_small_avx512(const uint8_t* packed, int64_t nbytes,
                                                           int nbits, int64_t e0, int64_t e1,
                                                           float zk, float sk, T* o) {
  // 2-bit: lane l reads byte l/4 and shifts by 2(l%4). 3-bit: code l spans bits 3l..3l+2 of the
  // 48-bit little-endian pair of words, i.e. byte 3l/8 (and the next one) shifted by 3l%8.
  alignas(64) static const int32_t kByte2[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
  alignas(64) static const int32_t kShift2[16] = {0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6};
  alignas(64) static const int32_t kByte3[16] = {0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5};
  alignas(64) static const int32_t kShift3[16] = {0, 3, 6, 1, 4, 7, 2, 5, 0, 3, 6, 1, 4, 7, 2, 5};
  const __m512 t = group_table_avx512(zk, sk);
  alignas(64) float table[16];
  _mm512_store_ps(table, t);
  const bool two = nbits == 2;
  const __m512i byte_idx = _mm512_load_si512(two ? kByte2 : kByte3);
  const __m512i next_idx = _mm512_add_epi32(byte_idx, _mm512_set1_epi32(1));
  const __m512i shift = _mm512_load_si512(two ? kShift2 : kShift3);
  const __m512i mask = _mm512_set1_epi32((1 << nbits) - 1);
  int64_t f = e0;
  for (; f < e1 && (f & 7); ++f) *o++ = convert<T>(table[small_code(packed, nbits, f)]);
  for (; f + 16 <= e1; f += 16, o += 16) {
    const int64_t byte = two ? f / 4 : 3 * (f / 8);
    if (byte + 16 > nbytes) break;
    const __m512i bytes = simd::load_bytes16_avx512(packed + byte);
    __m512i word = _mm512_permutexvar_epi32(byte_idx, bytes);
    if (!two)
      word = _mm512_or_si512(word, _mm512_slli_epi32(_mm512_permutexvar_epi32(next_idx, bytes), 8));
    const __m512i code = _mm512_and_si512(_mm512_srlv_epi32(word, shift), mask);
    const __m512 v = _mm512_permutexvar_ps(code, t);
    if constexpr (std::is_same_v<T, float>)
      _mm512_storeu_ps(o, v);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), simd::bf16_avx512(v));
  }
  for (; f < e1; ++f) *o++ = convert<T>(table[small_code(packed, nbits, f)]);
}
#endif

template <typename T>
void dequant_axis1_cpu(const uint8_t* packed, int64_t nbytes, int nbits, int64_t g, const float* s,
                       const float* z, int64_t f0, int64_t f1, bool use_simd, T* out) {
  const int64_t k0 = f0 / g, k1 = ceil_div(f1, g);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / g);
#ifdef QTUNE_SIMD_X86
  const bool avx512 = use_simd && simd::have_avx512();
#else
  (void)use_simd;
#endif
  at::parallel_for(k0, k1, grain, [&](int64_t a, int64_t b) {
    T table[16];
    for (int64_t k = a; k < b; ++k) {
      const float sk = s[k - k0], zk = z[k - k0];
      const int64_t e0 = std::max(f0, k * g), e1 = std::min(f1, (k + 1) * g);
      T* o = out + (e0 - f0);
      if (nbits == 8) {
        int64_t f = e0;
#ifdef QTUNE_SIMD_X86
        if (avx512) {
          const int64_t n = (e1 - f) / 16 * 16;
          affine8_avx512(packed + f, n, zk, sk, o);
          o += n;
          f += n;
        }
#endif
        for (; f < e1; ++f) *o++ = convert<T>((static_cast<float>(packed[f]) - zk) * sk);
        continue;
      }
#ifdef QTUNE_SIMD_X86
      if (avx512) {
        if (nbits == 4)
          group4_avx512(packed, e0, e1, zk, sk, o);
        else
          group_small_avx512(packed, nbytes, nbits, e0, e1, zk, sk, o);
        continue;
      }
#endif
      for (int c = 0; c < (1 << nbits); ++c)
        table[c] = convert<T>((static_cast<float>(c) - zk) * sk);
      int64_t f = e0;
      switch (nbits) {
        case 4:
          if (f < e1 && (f & 1)) *o++ = table[packed[f++ >> 1] >> 4];
          for (; f + 1 < e1; f += 2) {
            const uint8_t byte = packed[f >> 1];
            *o++ = table[byte & 15];
            *o++ = table[byte >> 4];
          }
          if (f < e1) *o = table[packed[f >> 1] & 15];
          break;
        default:  // 2 and 3 bits
          for (; f < e1; ++f) *o++ = table[small_code(packed, nbits, f)];
      }
    }
  });
}

}  // namespace

torch::Tensor HqqWeight::dequantize_rows(int64_t begin, int64_t end, torch::ScalarType dtype,
                                         torch::Device device) const {
  TORCH_CHECK(0 <= begin && begin <= end && end <= out_, "hqq: rows [", begin, ", ", end,
              ") outside [0, ", out_, ")");
  const int64_t f0 = begin * in_, f1 = end * in_;
  if (!use_cpu_kernel() || f0 == f1)
    return dequantize_flat(f0, f1).view({end - begin, in_}).to(device, dtype);
  const int64_t k0 = f0 / group_, k1 = ceil_div(f1, group_);
  auto [s, z] = group_params(k0, k1);
  s = s.contiguous();
  z = z.contiguous();
  const bool bf16 = dtype == torch::kBFloat16;
  torch::Tensor w = torch::empty(
      {end - begin, in_}, torch::TensorOptions().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const torch::Tensor& wq = tensors_.at("W_q");
  const uint8_t* packed = wq.data_ptr<uint8_t>();
  if (bf16)
    dequant_axis1_cpu(packed, wq.numel(), params_.nbits, group_, s.data_ptr<float>(),
                      z.data_ptr<float>(), f0, f1, simd_, w.data_ptr<c10::BFloat16>());
  else
    dequant_axis1_cpu(packed, wq.numel(), params_.nbits, group_, s.data_ptr<float>(),
                      z.data_ptr<float>(), f0, f1, simd_, w.data_ptr<float>());
  return w.to(device, dtype);
}

bool HqqWeight::use_cpu_kernel() const {
  return params_.axis == 1 && device().is_cpu() && !force_tensor_ops_;
}

torch::Tensor HqqWeight::dequantize(torch::ScalarType dtype, torch::Device device) const {
  // The CPU kernel writes fp32/bf16 straight into the result; otherwise row tiles bound the
  // fp32 temporary to one tile beside the result.
  const bool direct = use_cpu_kernel() && (dtype == torch::kFloat32 || dtype == torch::kBFloat16);
  const int64_t tile = std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(1, in_));
  if (direct || tile >= out_) return dequantize_rows(0, out_, dtype, device);
  torch::Tensor w = torch::empty({out_, in_}, tensors_.at("W_q").options().dtype(dtype));
  for (int64_t r = 0; r < out_; r += tile) {
    const int64_t e = std::min(out_, r + tile);
    w.slice(0, r, e).copy_(dequantize_rows(r, e, dtype, w.device()));
  }
  return w.to(device);
}

TensorState HqqWeight::state() const {
  TensorState st;
  st.tensors = tensors_;
  st.meta = Json{{"backend", "hqq"},      {"format_version", kFormatVersion},
                 {"shape", {out_, in_}},  {"options", params_.to_json()},
                 {"num_groups", groups_}, {"padded_numel", groups_ * group_}};
  return st;
}

void HqqWeight::to(torch::Device device) {
  // set_data keeps each TensorImpl, so handles taken from state() (module buffers) move too.
  for (auto& [_, t] : tensors_)
    if (t.device() != device) t.set_data(t.to(device));
}

// ---------------------------------------------------------------------------------------------
// HqqBackend

double HqqBackend::error_bound(const Json& options) const {
  const HqqParams p = parse_params(options);
  // Min/max quantization of a group of g Gaussian values has a range of about 2*sqrt(2 ln g)
  // standard deviations, and uniform rounding noise of range / (2^nbits - 1) / sqrt(12); so the
  // relative error is about k * sqrt(2 ln g) with k = 2 / ((2^nbits - 1) sqrt(12)). Measured on
  // N(0,1) 256x4096 (HqqMeasure.DISABLED_GroupTable, g = 8..4096) the ratio error/sqrt(2 ln g)
  // grows towards that k from below (4-bit: 0.024 at g=8, 0.031 at g=64, 0.034 at g=4096;
  // k = 0.0385). 2-bit is past the uniform-noise regime: measured up to 0.174, we use 0.19.
  // The solver only lowers the error; 8-bit meta codes add < 1%. Margin: 10% over k.
  // group_size 0 (whole rows or columns of unknown length) is bounded for up to 2^20 elements.
  const double k = p.nbits == 2 ? 0.19 : 2.0 / (p.max_code() * std::sqrt(12.0));
  const double g = p.group_size > 0 ? static_cast<double>(p.group_size) : std::ldexp(1.0, 20);
  return 1.1 * k * std::sqrt(2.0 * std::log(std::max(g, 2.0)));
}

std::unique_ptr<QuantizedWeight> HqqBackend::quantize(const torch::Tensor& w,
                                                      const Json& options) const {
  QTUNE_CHECK(w.defined() && w.dim() == 2, "hqq: the weight must be a 2-D matrix [out, in], got ",
              w.defined() ? shape_str(w.sizes()) : std::string("an undefined tensor"));
  QTUNE_CHECK(w.is_floating_point(), "hqq: the weight must be floating point, got ",
              c10::toString(w.scalar_type()));
  QTUNE_CHECK(w.numel() > 0, "hqq: the weight ", shape_str(w.sizes()), " is empty");
  const HqqParams p = parse_params(options);
  const int64_t out = w.size(0), in = w.size(1), n = out * in;
  const int64_t g = p.effective_group(out, in), groups = ceil_div(n, g), padded = groups * g;
  const auto dev = w.device();
  torch::NoGradGuard no_grad;

  // Output tensors, filled chunk by chunk (chunks start at multiples of kMetaGroup groups, so
  // 8-bit meta blocks and packing blocks never straddle two chunks). Chunks run in parallel and
  // only read the map (.at(), never operator[]), each writing its own slices.
  std::map<std::string, torch::Tensor> t;
  for (const auto& k : key_specs(p, groups, padded))
    t[k.key] = torch::zeros({k.size}, torch::TensorOptions().dtype(k.dtype).device(dev));
  auto store = [&](const std::string& name, const MetaStore& m, int64_t k0, int64_t k1) {
    if (m.plain.defined()) {
      t.at(name).slice(0, k0, k1).copy_(m.plain);
      return;
    }
    t.at(name + "_q").slice(0, k0, k1).copy_(m.q);
    const int64_t b0 = k0 / kMetaGroup;
    t.at(name + "_q.scale").slice(0, b0, b0 + m.scale.numel()).copy_(m.scale);
    t.at(name + "_q.zero").slice(0, b0, b0 + m.zero.numel()).copy_(m.zero);
  };
  auto finite = [](const torch::Tensor& x) {
    QTUNE_CHECK(torch::isfinite(x).all().item<bool>(),
                "hqq: the weight contains NaN or Inf values; cannot quantize it");
  };

  const int64_t chunk =
      std::max<int64_t>(1, kChunkElems / (g * kMetaGroup)) * kMetaGroup;  // groups per chunk
  const int64_t nchunks = ceil_div(groups, chunk);
  const torch::Tensor flat = w.reshape(-1);
  torch::Tensor padded_view;  // axis 0: the [g, G] reshape of the padded stream
  torch::Tensor codes_all;    // axis 0: unpacked codes, packed at the end
  if (p.axis == 0) {
    if (padded == n) {
      padded_view = flat.view({g, groups});
    } else {
      // Pad element f with element f - G (same column of the reshape, hence the same group).
      torch::Tensor xp = torch::empty({padded}, flat.options().dtype(torch::kFloat32));
      xp.slice(0, 0, n).copy_(flat);
      for (int64_t f = n; f < padded; f += groups) {
        const int64_t e = std::min(padded, f + groups);
        xp.slice(0, f, e).copy_(xp.slice(0, f - groups, e - groups));
      }
      padded_view = xp.view({g, groups});
    }
    codes_all = torch::empty({padded}, torch::TensorOptions().dtype(torch::kUInt8).device(dev));
  }

  auto run_chunk = [&](int64_t i) {
    const int64_t k0 = i * chunk, k1 = std::min(groups, k0 + chunk);
    torch::Tensor x;
    if (p.axis == 1) {
      x = flat.slice(0, k0 * g, std::min(n, k1 * g)).to(torch::kFloat32);
      if (k1 * g > n)  // the last group: pad with its last real element
        x = torch::cat({x, x.slice(0, x.numel() - 1).expand({k1 * g - n})});
      x = x.view({k1 - k0, g});
    } else {
      x = padded_view.slice(1, k0, k1).to(torch::kFloat32).t().contiguous();
    }
    finite(x);
    const GroupQuant gq = quantize_groups(x, p);
    store("scale", gq.scale, k0, k1);
    store("zero", gq.zero, k0, k1);
    if (p.axis == 1) {
      const PackBlock blk = pack_block(p.nbits);
      const torch::Tensor packed = pack_codes(gq.codes, p.nbits);
      const int64_t off = k0 * g / blk.codes * blk.bytes;
      t.at("W_q").slice(0, off, off + packed.numel()).copy_(packed);
    } else {
      codes_all.view({g, groups}).slice(1, k0, k1).copy_(gq.codes.t());
    }
  };
  if (dev.is_cpu()) {
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) run_chunk(i);
    });
  } else {
    for (int64_t i = 0; i < nchunks; ++i) run_chunk(i);
  }
  if (p.axis == 0) t["W_q"] = pack_codes(codes_all, p.nbits);
  return std::make_unique<HqqWeight>(out, in, p, std::move(t));
}

std::unique_ptr<QuantizedWeight> HqqBackend::load(const TensorState& state) const {
  const Json& m = state.meta;
  QTUNE_CHECK(m.is_object(), "hqq state: meta must be a JSON object, got ", m.dump());
  QTUNE_CHECK(m.contains("backend") && m["backend"] == "hqq",
              "hqq state: meta.backend must be \"hqq\", got ",
              m.contains("backend") ? m["backend"].dump() : std::string("nothing"));
  QTUNE_CHECK(m.contains("format_version") && m["format_version"] == kFormatVersion,
              "hqq state: meta.format_version must be ", kFormatVersion, ", got ",
              m.contains("format_version") ? m["format_version"].dump() : std::string("nothing"),
              " (re-quantize the model with this qtune)");
  const Json shape = m.contains("shape") ? m["shape"] : Json();
  QTUNE_CHECK(shape.is_array() && shape.size() == 2 && shape[0].is_number_integer() &&
                  shape[1].is_number_integer() && shape[0].get<int64_t>() > 0 &&
                  shape[1].get<int64_t>() > 0,
              "hqq state: meta.shape must be [out, in] with positive integers, got ", shape.dump());
  QTUNE_CHECK(m.contains("options"), "hqq state: meta.options is missing");
  const HqqParams p = parse_params(m["options"], "hqq state meta.options");
  const int64_t out = shape[0], in = shape[1];
  const int64_t g = p.effective_group(out, in), groups = ceil_div(out * in, g);
  for (const char* key : {"num_groups", "padded_numel"}) {
    const int64_t expected = std::string(key) == "num_groups" ? groups : groups * g;
    QTUNE_CHECK(!m.contains(key) || m[key] == expected, "hqq state: meta.", key, " is ",
                m[key].dump(), " but shape ", shape.dump(), " with these options gives ", expected);
  }

  const auto specs = key_specs(p, groups, groups * g);
  std::map<std::string, torch::Tensor> t;
  std::string expected_keys;
  for (const auto& k : specs) expected_keys += (expected_keys.empty() ? "" : ", ") + k.key;
  for (const auto& [key, _] : state.tensors) {
    bool known = false;
    for (const auto& k : specs) known |= k.key == key;
    QTUNE_CHECK(known, "hqq state: unexpected tensor \"", key, "\" (expected ", expected_keys, ")");
  }
  for (const auto& k : specs) {
    auto it = state.tensors.find(k.key);
    QTUNE_CHECK(it != state.tensors.end() && it->second.defined(), "hqq state: tensor \"", k.key,
                "\" is missing (expected ", expected_keys, ")");
    const torch::Tensor& x = it->second;
    QTUNE_CHECK(x.scalar_type() == k.dtype, "hqq state: tensor \"", k.key, "\" must be ",
                c10::toString(k.dtype), ", got ", c10::toString(x.scalar_type()));
    QTUNE_CHECK(x.dim() == 1 && x.size(0) == k.size, "hqq state: tensor \"", k.key,
                "\" must have shape [", k.size, "] for shape ", shape.dump(),
                " and these options, got ", shape_str(x.sizes()));
    QTUNE_CHECK(x.device() == state.tensors.begin()->second.device(),
                "hqq state: all tensors must be on one device; \"", k.key, "\" is on ",
                x.device().str());
    t[k.key] = x.contiguous();
  }
  return std::make_unique<HqqWeight>(out, in, p, std::move(t));
}

}  // namespace qtune::hqq

QTUNE_QUANT_PLUGIN("hqq", "1.0.0", qtune::hqq::HqqBackend)
