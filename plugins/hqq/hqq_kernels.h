// HQQ's CPU dequantization kernels for the axis-1 layout, where groups are contiguous runs of
// the flat code stream: each group is one (scale, zero) pair and a run of codes. For 2/3/4 bits
// the group's 2^nbits dequantized values are tabulated first ((c - zero) * scale, the very fp32
// expression of the tensor-op path, so both paths agree bit for bit) and the codes index the
// table; AVX-512 versions where the CPU has it (qtune/simd.h), a portable loop otherwise.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace qtune::hqq {

/// Dequantizes flat elements [f0, f1) of a packed stream `packed` (`nbytes` bytes, `nbits` per
/// code, groups of `g` consecutive elements) into out[0, f1 - f0), with the decoded fp32 scale
/// `s` and zero `z` of groups [f0 / g, ceil(f1 / g)). `use_simd` false forces the portable loop.
/// Parallel over groups (at::parallel_for); the result does not depend on the thread count.
void dequant_axis1_cpu(const uint8_t* packed, int64_t nbytes, int nbits, int64_t g, const float* s,
                       const float* z, int64_t f0, int64_t f1, bool use_simd, float* out);
void dequant_axis1_cpu(const uint8_t* packed, int64_t nbytes, int nbits, int64_t g, const float* s,
                       const float* z, int64_t f0, int64_t f1, bool use_simd, c10::BFloat16* out);

}  // namespace qtune::hqq
