// The int4 example's format, as functions on tensors: symmetric 4-bit absmax quantization of row
// blocks with one fp32 scale per group of `group_size` input columns (0 = one per row), and its
// inverse. Codes q in [-7, 7] are stored offset by 8 (1..15) in nibbles, two per byte: column 2j
// in the low nibble, column 2j + 1 in the high one; an odd row is padded with the code for 0.
// Quantization of one group x[0..g): scale = max|x| / 7, q = round(x / scale) clamped to
// [-7, 7] (symmetric: -8 is never used, so q and -q both exist and zero is exact), W ~ q * scale.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace int4_example {

constexpr double kQMax = 7.0;
constexpr int64_t kZeroCode = 8;  // the stored nibble of q = 0

/// Packed bytes per row of `in` columns.
inline int64_t packed_cols(int64_t in) { return (in + 1) / 2; }

/// Quantizes rows x [rows, in] (fp32, finite): returns {packed uint8 [rows, ceil(in / 2)],
/// scale fp32 [rows, G]} on x's device.
std::pair<torch::Tensor, torch::Tensor> quantize_rows(const torch::Tensor& x, int64_t group_size);

/// Dequantizes packed rows `packed` [rows, ceil(in / 2)] with scales [rows, G] to fp32 [rows, in].
torch::Tensor dequantize_rows(const torch::Tensor& packed, const torch::Tensor& scale,
                              int64_t group_size, int64_t in);

}  // namespace int4_example
