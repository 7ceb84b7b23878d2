// NF4 codec: code tables, the streaming CPU quantizer, the CPU dequantization kernels (portable
// scalar and AVX-512) and the tensor-op path used on other devices (see nf4_codec.h).
#include "nf4_codec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "qtune/error.h"
#include "qtune/simd.h"

namespace qtune::nf4 {

// ================================================================================================
// Code tables
// ================================================================================================

// QLoRA appendix E / bitsandbytes get_4bit_type("nf4") and dDequantizeNF4 (csrc/kernels.cu).
const std::array<float, 16> kNf4Values = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// bitsandbytes dQuantizeNF4 (csrc/kernels.cu): the thresholds of its decision tree, which are
// the midpoints of adjacent kNf4Values, written as float literals. Sorted ascending here.
const std::array<float, 15> kNf4Midpoints = {
    -0.8480964004993439f,  -0.6106329262256622f,  -0.4599952697753906f,   -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f,   0.2035212516784668f,   0.2920137718319893f,    0.3893125355243683f,
    0.5016634166240692f,   0.6427869200706482f,   0.8614784181118011f,
};

uint8_t nf4_code(float scaled) {
  // Branch-free count of thresholds strictly exceeded; identical to bitsandbytes' tree for every
  // input (including -0.0, which codes as 7 = 0.0).
  int code = 0;
  for (float m : kNf4Midpoints) code += scaled > m ? 1 : 0;
  return static_cast<uint8_t>(code);
}

torch::Tensor make_dynamic_map() {
  // bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for each
  // exponent i in 0..6, 2^i + 1 fp32 linspace(0.1, 1) boundaries, their midpoints scaled by
  // +-10^(i-6); then 0 and 1.0; sorted. No "additional items" for these arguments (2^0 - 1 = 0).
  // The same float32 tensor ops are used, so the values match bitsandbytes' table.
  static const double kScale[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
  std::vector<torch::Tensor> parts;
  for (int i = 0; i < 7; ++i) {
    const int64_t items = (int64_t{1} << i) + 1;
    torch::Tensor b = torch::linspace(0.1, 1.0, items, torch::kFloat);
    torch::Tensor means = (b.slice(0, 0, items - 1) + b.slice(0, 1, items)) / 2.0;
    parts.push_back(means * kScale[i]);
    parts.push_back(means * -kScale[i]);
  }
  parts.push_back(torch::tensor({0.0f, 1.0f}));
  torch::Tensor data = std::get<0>(torch::cat(parts).sort());
  TORCH_INTERNAL_ASSERT(data.numel() == 256);
  return data.contiguous();
}

const torch::Tensor& shared_nf4_map() {
  static const torch::Tensor* map = new torch::Tensor(
      torch::from_blob(const_cast<float*>(kNf4Values.data()), {16}, torch::kFloat).clone());
  return *map;
}

const torch::Tensor& shared_dynamic_map() {
  static const torch::Tensor* map = new torch::Tensor(make_dynamic_map());
  return *map;
}

torch::Tensor code_midpoints(const torch::Tensor& code) {
  const int64_t n = code.numel();
  return ((code.slice(0, 0, n - 1) + code.slice(0, 1, n)) * 0.5).contiguous();
}

// ================================================================================================
// Layout
// ================================================================================================

Layout Layout::make(int64_t out, int64_t in, int64_t block_size, bool double_quant,
                    int64_t nested_block_size) {
  Layout l;
  l.out = out;
  l.in = in;
  l.numel = out * in;
  l.block_size = block_size;
  l.blocks = (l.numel + block_size - 1) / block_size;
  l.double_quant = double_quant;
  l.nested_block_size = nested_block_size;
  l.nested_blocks = double_quant ? (l.blocks + nested_block_size - 1) / nested_block_size : 0;
  return l;
}

// ================================================================================================
// CPU kernel selection
// ================================================================================================

namespace {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
#ifdef QTUNE_SIMD_X86
  static const Isa isa = __builtin_cpu_supports("avx512f") ? Isa::kAvx512
                         : __builtin_cpu_supports("avx2")  ? Isa::kAvx2
                                                           : Isa::kScalar;
  return isa;
#else
  return Isa::kScalar;
#endif
}

std::atomic<int> g_forced_isa{-1};  // set_cpu_kernel(); -1 = the best the CPU has

Isa cpu_isa() {
  const int forced = g_forced_isa.load(std::memory_order_relaxed);
  return forced >= 0 ? static_cast<Isa>(forced) : best_isa();
}

}  // namespace

// ================================================================================================
// Quantize: CPU kernel
// ================================================================================================

namespace {

// Reads flat element ranges of a 2-D tensor of any float dtype and strides as fp32.
class Source {
 public:
  explicit Source(const torch::Tensor& w)
      : base_(static_cast<const char*>(w.data_ptr())),
        dtype_(w.scalar_type()),
        in_(w.size(1)),
        s0_(w.stride(0)),
        s1_(w.stride(1)),
        contiguous_(w.is_contiguous()) {}

  void load(int64_t e0, int64_t n, float* dst) const {
    switch (dtype_) {
      case torch::kFloat:
        return load_as<float>(e0, n, dst);
      case torch::kDouble:
        return load_as<double>(e0, n, dst);
      case torch::kBFloat16:
        return load_as<c10::BFloat16>(e0, n, dst);
      case torch::kHalf:
        return load_as<c10::Half>(e0, n, dst);
      default:
        TORCH_INTERNAL_ASSERT(false, "nf4: unsupported dtype reached the kernel");
    }
  }

 private:
  template <typename T>
  void load_as(int64_t e0, int64_t n, float* dst) const {
    const T* p = reinterpret_cast<const T*>(base_);
    if (contiguous_) {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[e0 + i]);
      return;
    }
    int64_t r = e0 / in_, c = e0 % in_;
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = static_cast<float>(p[r * s0_ + c * s1_]);
      if (++c == in_) c = 0, ++r;
    }
  }

  const char* base_;
  torch::ScalarType dtype_;
  int64_t in_, s0_, s1_;
  bool contiguous_;
};

// max |x| over a block; returns NaN when the block holds NaN or Inf (so callers can report it).
float block_absmax(const float* x, int64_t n) {
  float a = 0.0f, poison = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::fabs(x[i]);
    a = v > a ? v : a;
    poison += x[i] - x[i];  // 0 for finite values, NaN for NaN or +-Inf
  }
  return poison == 0.0f ? a : std::numeric_limits<float>::quiet_NaN();
}

[[noreturn]] void throw_non_finite(const Layout& l, int64_t block) {
  const int64_t e = block * l.block_size;
  throw UserError(detail::concat("nf4: cannot quantize a weight [", l.out, ", ", l.in,
                                 "] that holds NaN or Inf (in the ", l.block_size,
                                 "-element block starting at row ", e / l.in, ", column ", e % l.in,
                                 "); check the checkpoint or the training that produced it"));
}

// Nearest entry of an ascending code table, given its midpoints: the number of midpoints
// strictly below x (torch.searchsorted with right=False computes the same).
inline uint8_t nearest_code(const float* mids, int64_t n_mids, float x) {
  return static_cast<uint8_t>(std::lower_bound(mids, mids + n_mids, x) - mids);
}

#ifdef QTUNE_SIMD_X86
// NF4 codes of x[i] * recip for i < n rounded down to 16: per threshold one compare and a
// masked count, the same `>` on the same fp32 product as nf4_code(). Returns how many were done.
__attribute__((target("avx512f"))) int64_t codes_avx512(const float* x, int64_t n, float recip,
                                                        uint8_t* codes) {
  const __m512 r = _mm512_set1_ps(recip);
  const __m512i one = _mm512_set1_epi32(1);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), r);
    __m512i c = _mm512_setzero_si512();
    for (float m : kNf4Midpoints)
      c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(v, _mm512_set1_ps(m), _CMP_GT_OQ), c, one);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(c));
  }
  return i;
}

__attribute__((target("avx2"))) int64_t codes_avx2(const float* x, int64_t n, float recip,
                                                   uint8_t* codes) {
  const __m256 r = _mm256_set1_ps(recip);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_mul_ps(_mm256_loadu_ps(x + i), r);
    const __m256 b = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8), r);
    __m256i ca = _mm256_setzero_si256(), cb = _mm256_setzero_si256();
    for (float m : kNf4Midpoints) {
      const __m256 vm = _mm256_set1_ps(m);  // a true compare is all ones (-1): subtract it
      ca = _mm256_sub_epi32(ca, _mm256_castps_si256(_mm256_cmp_ps(a, vm, _CMP_GT_OQ)));
      cb = _mm256_sub_epi32(cb, _mm256_castps_si256(_mm256_cmp_ps(b, vm, _CMP_GT_OQ)));
    }
    // packus works per 128-bit lane; permute4x64 puts the 16 words back in element order.
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(ca, cb), 0xD8);
    _mm_storeu_si128(
        reinterpret_cast<__m128i*>(codes + i),
        _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1)));
  }
  return i;
}
#endif

void pack_block(const float* x, int64_t n, float absmax, uint8_t* dst) {
  // An all-zero block codes as 7 (NF4 0.0), so it dequantizes to exact zeros whatever its
  // (double-quantized) scale is; bitsandbytes would compute 0 * (1/0) = NaN and code 0 there.
  const float recip = absmax > 0.0f ? 1.0f / absmax : 0.0f;
  uint8_t codes[4096];  // block_size <= 4096
  int64_t i = 0;
#ifdef QTUNE_SIMD_X86
  switch (cpu_isa()) {
    case Isa::kAvx512:
      i = codes_avx512(x, n, recip, codes);
      break;
    case Isa::kAvx2:
      i = codes_avx2(x, n, recip, codes);
      break;
    case Isa::kScalar:
      break;
  }
#endif
  for (; i < n; ++i) codes[i] = nf4_code(x[i] * recip);
  int64_t k = 0;
  for (; k + 1 < n; k += 2) dst[k / 2] = static_cast<uint8_t>((codes[k] << 4) | codes[k + 1]);
  // Odd total length: the last byte's low nibble codes the zero padding, as bitsandbytes does.
  if (k < n) dst[k / 2] = static_cast<uint8_t>((codes[k] << 4) | 7);
}

}  // namespace

Packed quantize_cpu(const torch::Tensor& w, const Layout& l) {
  TORCH_INTERNAL_ASSERT(w.dim() == 2 && w.size(0) == l.out && w.size(1) == l.in && w.is_cpu());
  const Source src(w);
  Packed p;
  p.data = torch::empty({l.packed_bytes(), 1}, torch::kUInt8);
  p.quant_map = shared_nf4_map().alias();
  uint8_t* data = p.data.data_ptr<uint8_t>();
  const int64_t bs = l.block_size;
  // Work items are groups of blocks (a nested block under double quantization): each thread
  // holds one group's absmax values and one block of fp32, never more.
  const int64_t group = l.double_quant ? l.nested_block_size : 256;
  const int64_t groups = (l.blocks + group - 1) / group;
  auto block_len = [&](int64_t b) { return std::min(bs, l.numel - b * bs); };

  // Pass 1 (double quantization): offset = mean of all absmax. Per-group partial sums are
  // added in a fixed order, so the result does not depend on the thread count.
  float offset = 0.0f;
  if (l.double_quant) {
    std::vector<double> sums(groups, 0.0);
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      std::vector<float> buf(bs);
      for (int64_t g = g0; g < g1; ++g) {
        double s = 0.0;
        for (int64_t b = g * group; b < std::min(l.blocks, (g + 1) * group); ++b) {
          src.load(b * bs, block_len(b), buf.data());
          const float a = block_absmax(buf.data(), block_len(b));
          if (std::isnan(a)) throw_non_finite(l, b);
          s += a;
        }
        sums[g] = s;
      }
    });
    double total = 0.0;
    for (double s : sums) total += s;
    offset = static_cast<float>(total / static_cast<double>(l.blocks));
  }

  torch::Tensor mids;
  if (l.double_quant) {
    p.absmax = torch::empty({l.blocks}, torch::kUInt8);
    p.nested_absmax = torch::empty({l.nested_blocks}, torch::kFloat);
    p.nested_quant_map = shared_dynamic_map().alias();
    p.offset = offset;
    mids = code_midpoints(shared_dynamic_map());
  } else {
    p.absmax = torch::empty({l.blocks}, torch::kFloat);
  }

  // Pass 2: per group, the blocks' absmax (and their double quantization), then the codes.
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> buf(bs), am(group);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b0 = g * group, b1 = std::min(l.blocks, b0 + group);
      for (int64_t b = b0; b < b1; ++b) {
        src.load(b * bs, block_len(b), buf.data());
        am[b - b0] = block_absmax(buf.data(), block_len(b));
        if (std::isnan(am[b - b0])) throw_non_finite(l, b);
      }
      if (l.double_quant) {
        // bitsandbytes: absmax -= offset (fp32), then quantize_blockwise with the dynamic code.
        float a2 = 0.0f;
        for (int64_t b = b0; b < b1; ++b) a2 = std::max(a2, std::fabs(am[b - b0] - offset));
        const float r2 = a2 > 0.0f ? 1.0f / a2 : 0.0f;
        uint8_t* q = p.absmax.data_ptr<uint8_t>();
        const float* m = mids.data_ptr<float>();
        for (int64_t b = b0; b < b1; ++b) q[b] = nearest_code(m, 255, (am[b - b0] - offset) * r2);
        p.nested_absmax.data_ptr<float>()[g] = a2;
      } else {
        std::copy(am.begin(), am.begin() + (b1 - b0), p.absmax.data_ptr<float>() + b0);
      }
      for (int64_t b = b0; b < b1; ++b) {
        src.load(b * bs, block_len(b), buf.data());
        pack_block(buf.data(), block_len(b), am[b - b0], data + b * bs / 2);
      }
    }
  });
  return p;
}

// ================================================================================================
// Quantize: tensor-op path
// ================================================================================================

namespace {

// Flat elements [s, e) of W as a contiguous fp32 tensor; copies only the rows that cover them.
torch::Tensor flat_range(const torch::Tensor& w, int64_t s, int64_t e) {
  const int64_t in = w.size(1), r0 = s / in, r1 = (e - 1) / in + 1;
  torch::Tensor rows = w.narrow(0, r0, r1 - r0).reshape({-1});
  return rows.slice(0, s - r0 * in, e - r0 * in).to(torch::kFloat).contiguous();
}

// Pads a 1-D tensor with zeros to `n` elements.
torch::Tensor pad_to(const torch::Tensor& t, int64_t n) {
  if (t.numel() == n) return t;
  return torch::cat({t, torch::zeros({n - t.numel()}, t.options())});
}

// Reciprocal with 0 for 0 (an all-zero block).
torch::Tensor safe_reciprocal(const torch::Tensor& a) {
  return a.reciprocal().masked_fill(a == 0, 0.0);
}

}  // namespace

Packed quantize_torch(const torch::Tensor& w, const Layout& l, int64_t chunk_elems) {
  TORCH_INTERNAL_ASSERT(w.dim() == 2 && w.size(0) == l.out && w.size(1) == l.in);
  const auto dev = w.device();
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(dev);
  const int64_t bs = l.block_size;
  const int64_t chunk_blocks = std::max<int64_t>(1, chunk_elems / bs);
  Packed p;
  p.data = torch::empty({l.packed_bytes(), 1}, f32.dtype(torch::kUInt8));
  p.quant_map = dev.is_cpu() ? shared_nf4_map().alias() : shared_nf4_map().to(dev);
  torch::Tensor data = p.data.view({-1});
  torch::Tensor absmax = torch::empty({l.blocks}, f32);
  const torch::Tensor mids =
      torch::tensor(std::vector<float>(kNf4Midpoints.begin(), kNf4Midpoints.end())).to(dev);

  for (int64_t b0 = 0; b0 < l.blocks; b0 += chunk_blocks) {
    const int64_t b1 = std::min(l.blocks, b0 + chunk_blocks), nb = b1 - b0;
    const int64_t s = b0 * bs, e = std::min(l.numel, b1 * bs);
    torch::Tensor x = pad_to(flat_range(w, s, e), nb * bs).view({nb, bs});
    if (!torch::isfinite(x).all().item<bool>()) {
      const int64_t bad = torch::nonzero(~torch::isfinite(x)).index({0, 0}).item<int64_t>();
      throw_non_finite(l, b0 + bad);
    }
    torch::Tensor am = x.abs().amax(1);
    absmax.slice(0, b0, b1).copy_(am);
    torch::Tensor scaled = x * safe_reciprocal(am).unsqueeze(1);
    torch::Tensor codes =
        torch::searchsorted(mids, scaled.reshape({-1})).slice(0, 0, e - s).to(torch::kUInt8);
    if (codes.numel() % 2) codes = torch::cat({codes, torch::full({1}, 7, codes.options())});
    torch::Tensor pairs = codes.view({-1, 2});
    data.slice(0, s / 2, s / 2 + pairs.size(0))
        .copy_(torch::bitwise_or(pairs.select(1, 0) * 16, pairs.select(1, 1)));
  }

  if (!l.double_quant) {
    p.absmax = absmax;
    return p;
  }
  const float offset =
      static_cast<float>(absmax.to(torch::kDouble).sum().item<double>() / l.blocks);
  const int64_t nbs = l.nested_block_size;
  torch::Tensor centred = pad_to(absmax - offset, l.nested_blocks * nbs).view({-1, nbs});
  torch::Tensor a2 = centred.abs().amax(1);
  torch::Tensor scaled = centred * safe_reciprocal(a2).unsqueeze(1);
  const torch::Tensor dmap = dev.is_cpu() ? shared_dynamic_map() : shared_dynamic_map().to(dev);
  p.absmax = torch::searchsorted(code_midpoints(dmap), scaled.reshape({-1}))
                 .slice(0, 0, l.blocks)
                 .to(torch::kUInt8);
  p.nested_absmax = a2.contiguous();
  p.nested_quant_map = dev.is_cpu() ? shared_dynamic_map().alias() : dmap;
  p.offset = offset;
  return p;
}

// ================================================================================================
// Dequantize
// ================================================================================================

torch::Tensor block_scales(const Packed& p, const Layout& l, int64_t b0, int64_t b1) {
  if (!l.double_quant) return p.absmax.slice(0, b0, b1);
  torch::Tensor q = p.absmax.slice(0, b0, b1).to(torch::kLong);
  torch::Tensor nested_index = torch::arange(b0, b1, q.options()).div(l.nested_block_size, "floor");
  // Two separate fp32 ops (multiply, then add), matching the CPU kernel's rounding.
  return p.nested_quant_map.index_select(0, q) * p.nested_absmax.index_select(0, nested_index) +
         p.offset;
}

namespace {

template <typename T>
inline T from_float(float v) {
  return static_cast<T>(v);
}

// Portable kernel: codes of bytes [0, nbytes) -> 2 * nbytes values.
template <typename T>
void expand_bytes_scalar(const uint8_t* src, int64_t nbytes, const float* lut, float scale,
                         T* dst) {
  for (int64_t i = 0; i < nbytes; ++i) {
    const uint8_t b = src[i];
    dst[2 * i] = from_float<T>(lut[b >> 4] * scale);
    dst[2 * i + 1] = from_float<T>(lut[b & 15] * scale);
  }
}

#ifdef QTUNE_SIMD_X86
// ---- AVX-512: 16 bytes -> 32 values per step. The 16-entry table sits in one register and
// vpermps does the lookup; vpermt2ps interleaves high/low nibbles back into element order.
// Products are the same single fp32 multiply as the scalar kernel, so results are identical.
__attribute__((target("avx512f"))) inline void expand16_avx512(const uint8_t* src, __m512 table,
                                                               __m512 scale, __m512* o0,
                                                               __m512* o1) {
  const __m512i bytes = simd::load_bytes16_avx512(src);
  const __m512i hi = _mm512_srli_epi32(bytes, 4);
  const __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
  const __m512 vh = _mm512_mul_ps(_mm512_permutexvar_ps(hi, table), scale);
  const __m512 vl = _mm512_mul_ps(_mm512_permutexvar_ps(lo, table), scale);
  simd::interleave_avx512(vh, vl, o0, o1);  // high nibble first (bitsandbytes)
}

__attribute__((target("avx512f"))) void expand_bytes_avx512(const uint8_t* src, int64_t nbytes,
                                                            const float* lut, float scale,
                                                            float* dst) {
  const __m512 table = _mm512_loadu_ps(lut), vs = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= nbytes; i += 16) {
    __m512 o0, o1;
    expand16_avx512(src + i, table, vs, &o0, &o1);
    _mm512_storeu_ps(dst + 2 * i, o0);
    _mm512_storeu_ps(dst + 2 * i + 16, o1);
  }
  expand_bytes_scalar(src + i, nbytes - i, lut, scale, dst + 2 * i);
}

__attribute__((target("avx512f"))) void expand_bytes_avx512(const uint8_t* src, int64_t nbytes,
                                                            const float* lut, float scale,
                                                            c10::BFloat16* dst) {
  const __m512 table = _mm512_loadu_ps(lut), vs = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= nbytes; i += 16) {
    __m512 o0, o1;
    expand16_avx512(src + i, table, vs, &o0, &o1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i), simd::bf16_avx512(o0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i + 16), simd::bf16_avx512(o1));
  }
  expand_bytes_scalar(src + i, nbytes - i, lut, scale, dst + 2 * i);
}

// ---- AVX2: 8 bytes -> 16 values per step. vpermps looks up 8 entries, so the table is split
// in halves and bit 3 of the code (moved to the sign bit) selects one with blendvps.
__attribute__((target("avx2"))) inline __m256 lookup16_avx2(__m256i code, __m256 lo_half,
                                                            __m256 hi_half) {
  const __m256 a = _mm256_permutevar8x32_ps(lo_half, code);
  const __m256 b = _mm256_permutevar8x32_ps(hi_half, code);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
}

__attribute__((target("avx2"))) inline void expand8_avx2(const uint8_t* src, __m256 lo_half,
                                                         __m256 hi_half, __m256 scale, __m256* o0,
                                                         __m256* o1) {
  const __m256i bytes =
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  const __m256 vh =
      _mm256_mul_ps(lookup16_avx2(_mm256_srli_epi32(bytes, 4), lo_half, hi_half), scale);
  const __m256 vl = _mm256_mul_ps(
      lookup16_avx2(_mm256_and_si256(bytes, _mm256_set1_epi32(15)), lo_half, hi_half), scale);
  // unpack interleaves within 128-bit lanes: a = h0 l0 h1 l1 | h4 l4 h5 l5, b = h2 .. | h6 ..
  const __m256 a = _mm256_unpacklo_ps(vh, vl), b = _mm256_unpackhi_ps(vh, vl);
  *o0 = _mm256_permute2f128_ps(a, b, 0x20);
  *o1 = _mm256_permute2f128_ps(a, b, 0x31);
}

__attribute__((target("avx2"))) inline __m256i bf16_bits_avx2(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))),
                           16);
}

__attribute__((target("avx2"))) void expand_bytes_avx2(const uint8_t* src, int64_t nbytes,
                                                       const float* lut, float scale, float* dst) {
  const __m256 lo_half = _mm256_loadu_ps(lut), hi_half = _mm256_loadu_ps(lut + 8);
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= nbytes; i += 8) {
    __m256 o0, o1;
    expand8_avx2(src + i, lo_half, hi_half, vs, &o0, &o1);
    _mm256_storeu_ps(dst + 2 * i, o0);
    _mm256_storeu_ps(dst + 2 * i + 8, o1);
  }
  expand_bytes_scalar(src + i, nbytes - i, lut, scale, dst + 2 * i);
}

__attribute__((target("avx2"))) void expand_bytes_avx2(const uint8_t* src, int64_t nbytes,
                                                       const float* lut, float scale,
                                                       c10::BFloat16* dst) {
  const __m256 lo_half = _mm256_loadu_ps(lut), hi_half = _mm256_loadu_ps(lut + 8);
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= nbytes; i += 8) {
    __m256 o0, o1;
    expand8_avx2(src + i, lo_half, hi_half, vs, &o0, &o1);
    // packus works per 128-bit lane (values fit in 16 bits), permute4x64 restores the order.
    const __m256i packed =
        _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits_avx2(o0), bf16_bits_avx2(o1)), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i), packed);
  }
  expand_bytes_scalar(src + i, nbytes - i, lut, scale, dst + 2 * i);
}
#endif  // QTUNE_SIMD_X86

template <typename T>
void expand_bytes(const uint8_t* src, int64_t nbytes, const float* lut, float scale, T* dst) {
#ifdef QTUNE_SIMD_X86
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    switch (cpu_isa()) {
      case Isa::kAvx512:
        return expand_bytes_avx512(src, nbytes, lut, scale, dst);
      case Isa::kAvx2:
        return expand_bytes_avx2(src, nbytes, lut, scale, dst);
      case Isa::kScalar:
        break;
    }
  }
#endif
  expand_bytes_scalar(src, nbytes, lut, scale, dst);
}

template <typename T>
void dequantize_range(const Packed& p, const Layout& l, int64_t e0, int64_t e1, T* out) {
  if (e1 <= e0) return;
  const uint8_t* data = p.data.data_ptr<uint8_t>();
  const float* lut = p.quant_map.data_ptr<float>();
  const int64_t bs = l.block_size;
  const float* absmax_f = l.double_quant ? nullptr : p.absmax.data_ptr<float>();
  const uint8_t* absmax_q = l.double_quant ? p.absmax.data_ptr<uint8_t>() : nullptr;
  const float* code2 = l.double_quant ? p.nested_quant_map.data_ptr<float>() : nullptr;
  const float* absmax2 = l.double_quant ? p.nested_absmax.data_ptr<float>() : nullptr;
  const int64_t first = e0 / bs, last = (e1 - 1) / bs;
  // ~16K elements per task: large enough to amortise scheduling, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, 16384 / bs);
  at::parallel_for(first, last + 1, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float scale;
      if (l.double_quant) {
        scale = code2[absmax_q[b]] * absmax2[b / l.nested_block_size];
        scale += p.offset;  // separate statement: no fused multiply-add, as in block_scales()
      } else {
        scale = absmax_f[b];
      }
      int64_t s = std::max(e0, b * bs);
      const int64_t t = std::min(e1, (b + 1) * bs);
      T* dst = out + (s - e0);
      if (s & 1) {  // starts on a low nibble (odd row length)
        *dst++ = from_float<T>(lut[data[s / 2] & 15] * scale);
        ++s;
      }
      const int64_t pairs = (t - s) / 2;
      expand_bytes(data + s / 2, pairs, lut, scale, dst);
      if ((t - s) & 1) dst[2 * pairs] = from_float<T>(lut[data[(t - 1) / 2] >> 4] * scale);
    }
  });
}

}  // namespace

void dequantize_rows_cpu(const Packed& p, const Layout& l, int64_t r0, int64_t r1,
                         torch::Tensor& out) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.is_cpu() && out.numel() == (r1 - r0) * l.in);
  const int64_t e0 = r0 * l.in, e1 = r1 * l.in;
  switch (out.scalar_type()) {
    case torch::kFloat:
      return dequantize_range(p, l, e0, e1, out.data_ptr<float>());
    case torch::kBFloat16:
      return dequantize_range(p, l, e0, e1, out.data_ptr<c10::BFloat16>());
    case torch::kHalf:
      return dequantize_range(p, l, e0, e1, out.data_ptr<c10::Half>());
    case torch::kDouble:
      return dequantize_range(p, l, e0, e1, out.data_ptr<double>());
    default:
      TORCH_INTERNAL_ASSERT(false, "nf4: unsupported output dtype reached the kernel");
  }
}

torch::Tensor dequantize_rows_torch(const Packed& p, const Layout& l, int64_t r0, int64_t r1,
                                    torch::ScalarType dtype, int64_t chunk_elems) {
  torch::Tensor out = torch::empty({r1 - r0, l.in}, p.data.options().dtype(dtype));
  if (out.numel() == 0) return out;
  torch::Tensor flat_out = out.view({-1});
  torch::Tensor data = p.data.view({-1});
  const int64_t bs = l.block_size, e0 = r0 * l.in, e1 = r1 * l.in;
  const int64_t chunk_blocks = std::max<int64_t>(1, chunk_elems / bs);
  for (int64_t b0 = e0 / bs; b0 * bs < e1; b0 += chunk_blocks) {
    const int64_t b1 = std::min(l.blocks, b0 + chunk_blocks), nb = b1 - b0;
    const int64_t s = b0 * bs, e = std::min(l.numel, b1 * bs);
    torch::Tensor bytes = data.slice(0, s / 2, (e + 1) / 2);
    torch::Tensor codes =
        torch::stack({bytes.div(16, "floor"), torch::bitwise_and(bytes, 15)}, 1).view({-1});
    torch::Tensor vals = p.quant_map.index_select(0, codes.slice(0, 0, e - s).to(torch::kLong));
    vals =
        (pad_to(vals, nb * bs).view({nb, bs}) * block_scales(p, l, b0, b1).unsqueeze(1)).view({-1});
    const int64_t lo = std::max(e0, s), hi = std::min(e1, e);
    flat_out.slice(0, lo - e0, hi - e0).copy_(vals.slice(0, lo - s, hi - s));
  }
  return out;
}

std::string cpu_kernel_name() {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

bool set_cpu_kernel(const std::string& name) {
  int isa;
  if (name == "auto")
    isa = -1;
  else if (name == "scalar")
    isa = static_cast<int>(Isa::kScalar);
  else if (name == "avx2")
    isa = static_cast<int>(Isa::kAvx2);
  else if (name == "avx512")
    isa = static_cast<int>(Isa::kAvx512);
  else
    return false;
  if (isa > static_cast<int>(best_isa())) return false;
  g_forced_isa.store(isa);
  return true;
}

}  // namespace qtune::nf4
