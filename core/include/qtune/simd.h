// SDK: small x86-64 AVX-512 helpers for table-lookup dequantization kernels in plugins (nf4 and
// hqq use them). Header-only; every function is compiled for AVX-512F by its own target
// attribute, so the plugin itself needs no -mavx512f and must call them only where
// have_avx512() is true (keep a portable loop beside them, and test both against a reference).
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QTUNE_SIMD_X86 1

namespace qtune::simd {

/// True when this CPU runs AVX-512F (checked once).
inline bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

/// fp32 -> bf16 bits, rounded to nearest even: what c10::BFloat16's conversion gives for finite
/// values (NaN is not special-cased).
__attribute__((target("avx512f"))) inline __m256i bf16_avx512(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/// Interleaves two 16-lane vectors into 32 values in element order a0 b0 a1 b1 ... a15 b15:
/// `*o0` gets a0..b7, `*o1` a8..b15. For 4-bit codes packed two per byte, `a` holds the values
/// of the nibble that comes first in element order.
__attribute__((target("avx512f"))) inline void interleave_avx512(__m512 a, __m512 b, __m512* o0,
                                                                 __m512* o1) {
  alignas(64) static const int32_t kFirst[16] = {0, 16, 1, 17, 2, 18, 3, 19,
                                                 4, 20, 5, 21, 6, 22, 7, 23};
  alignas(64) static const int32_t kSecond[16] = {8,  24, 9,  25, 10, 26, 11, 27,
                                                  12, 28, 13, 29, 14, 30, 15, 31};
  *o0 = _mm512_permutex2var_ps(a, _mm512_load_si512(kFirst), b);
  *o1 = _mm512_permutex2var_ps(a, _mm512_load_si512(kSecond), b);
}

/// 16 bytes from `src` (unaligned), one per 32-bit lane.
__attribute__((target("avx512f"))) inline __m512i load_bytes16_avx512(const uint8_t* src) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}

}  // namespace qtune::simd

#endif
