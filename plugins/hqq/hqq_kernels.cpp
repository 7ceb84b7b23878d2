// HQQ CPU dequantization kernels for the axis-1 layout (see hqq_kernels.h).
#include "hqq_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "hqq_codec.h"
#include "qtune/simd.h"

namespace qtune::hqq {
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
void dequant_axis1(const uint8_t* packed, int64_t nbytes, int nbits, int64_t g, const float* s,
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

void dequant_axis1_cpu(const uint8_t* packed, int64_t nbytes, int nbits, int64_t g, const float* s,
                       const float* z, int64_t f0, int64_t f1, bool use_simd, float* out) {
  dequant_axis1<float>(packed, nbytes, nbits, g, s, z, f0, f1, use_simd, out);
}

void dequant_axis1_cpu(const uint8_t* packed, int64_t nbytes, int nbits, int64_t g, const float* s,
                       const float* z, int64_t f0, int64_t f1, bool use_simd, c10::BFloat16* out) {
  dequant_axis1<c10::BFloat16>(packed, nbytes, nbits, g, s, z, f0, f1, use_simd, out);
}

}  // namespace qtune::hqq
