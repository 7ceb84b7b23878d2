// Half-Quadratic Quantization (HQQ; Badri & Shaji, 2023, github.com/mobiusml/hqq) as a qtune
// quantization backend: affine group quantization W ≈ (W_q - zero) * scale whose zero-points are
// refined by HQQ's half-quadratic proximal solver, with dense 2/3/4/8-bit packing.
//
// The plugin follows the one plugin layout: hqq_codec.{h,cpp} (this file: options, bit packing,
// the group quantizer with HQQ's solver), hqq_kernels.{h,cpp} (the CPU dequantization kernels),
// hqq_backend.{h,cpp} (HqqWeight, HqqBackend) and hqq_plugin.cpp (the entry point). Everything
// is plugin-internal; the declarations are in headers so the unit tests (which link hqq_objects
// directly) can check the pieces one by one.
//
// Layout (format_version 1), for W[out, in] with N = out * in elements:
// - Groups. group_size g (0 = a whole row for axis 1, a whole column for axis 0) splits the
//   row-major flat stream of W exactly as hqq does after `W.reshape([-1, g])` (axis 1) or
//   `W.reshape([g, -1])` (axis 0, groups are the columns of that reshape):
//     axis 1: group k holds flat elements [k*g, (k+1)*g)           (contiguous runs)
//     axis 0: group k holds flat elements k, k+G, k+2G, ...         (stride G = number of groups)
//   hqq requires g to divide N; we accept any shape by padding the flat stream to Np = G*g with
//   copies of a real element of the same group (so padding never widens a group's range). The
//   padding codes are stored (fewer than g of them) and never dequantized. A group_size larger
//   than N means one group of the whole matrix (g = N).
// - Codes. "W_q": uint8 [packed_bytes(Np, nbits)], the flat code stream (length Np) packed
//   little-endian, least significant bits first:
//     8-bit: one code per byte;  4-bit: code 2j in bits 0-3 of byte j, 2j+1 in bits 4-7;
//     2-bit: code 4j+i in bits 2i..2i+1 of byte j;
//     3-bit: 8 codes per 3 bytes: bytes 3j..3j+2 form the 24-bit little-endian word
//            b0 | b1<<8 | b2<<16 whose bits 3i..3i+2 hold code 8j+i (exactly 3 bits/code;
//            hqq packs 10 codes per int32, 3.2 bits/code).
// - Scale and zero, one per group, dequantization W = (W_q - zero) * scale. hqq computes with
//   the inverse scale (W_q = round(W * inv + zero)) and stores 1/inv: the same convention as ours.
//   "scale", "zero": [G] in meta_dtype (fp16 by default: 4-bit g64 costs 4.5 bits/parameter).
//   With quant_scale (quant_zero) they are replaced by 8-bit codes "scale_q" ("zero_q") uint8 [G]
//   plus per-128-group fp32 "scale_q.scale"/"scale_q.zero" ("zero_q.scale"/"zero_q.zero"),
//   decoded with the same affine rule: scale = (scale_q - scale_q.zero) * scale_q.scale.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "qtune/options.h"

namespace qtune::hqq {

/// ceil(a / b) for positive b.
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Options

/// Groups of 128 consecutive per-group scales (zeros) share one 8-bit quantizer when quant_scale
/// (quant_zero) is on; hqq's scale_quant_params use group_size 128 as well.
constexpr int64_t kMetaGroup = 128;

/// Resolved, validated options of one HQQ weight.
struct HqqParams {
  int nbits = 4;                    // 2, 3, 4 or 8
  int64_t group_size = 64;          // as given; 0 = whole row (axis 1) / whole column (axis 0)
  int axis = 1;                     // 0 or 1 (hqq semantics, see the file comment)
  bool optimize = true;             // run the proximal zero-point solver
  int iterations = 20;              // solver iterations (hqq default 20)
  bool quant_scale = false;         // 8-bit scales
  bool quant_zero = false;          // 8-bit zero-points
  std::string meta_dtype = "fp16";  // "fp16" or "fp32" storage of scale/zero
  // hqq's optimize_weights_proximal_legacy defaults (not user options).
  double lp_norm = 0.7;
  double beta = 10.0;
  double kappa = 1.01;

  int max_code() const { return (1 << nbits) - 1; }
  torch::ScalarType meta_scalar_type() const {
    return meta_dtype == "fp32" ? torch::kFloat32 : torch::kFloat16;
  }
  /// The effective group size for a W[out, in]: at most the whole matrix (a larger group would
  /// only store padding).
  int64_t effective_group(int64_t out, int64_t in) const {
    return group_size > 0 ? std::min(group_size, std::max<int64_t>(1, out * in))
                          : (axis == 1 ? in : out);
  }
  Json to_json() const;
};

/// The option schema (names, defaults, help).
std::vector<OptionSpec> option_schema();
/// Checks resolved options (types already checked by resolve_options); throws UserError naming
/// `<context>.<key>` and the allowed values.
HqqParams parse_params(const Json& options, const std::string& context = "quant.options");

// ---------------------------------------------------------------------------------------------
// Bit packing (layout in the file comment). Codes are uint8 values in [0, 2^nbits).

/// Codes per packing block and bytes per block: 8-bit 1/1, 4-bit 2/1, 2-bit 4/1, 3-bit 8/3.
struct PackBlock {
  int64_t codes;
  int64_t bytes;
};
PackBlock pack_block(int nbits);
/// Bytes needed for `count` codes (rounded up to whole blocks).
int64_t packed_bytes(int64_t count, int nbits);
/// Packs a 1-D uint8 code tensor (any length; the tail block is zero-filled). Device-agnostic.
torch::Tensor pack_codes(const torch::Tensor& codes, int nbits);
/// Codes [begin, end) of a packed stream, uint8 [end - begin] on the stream's device.
torch::Tensor unpack_codes(const torch::Tensor& packed, int nbits, int64_t begin, int64_t end);

// ---------------------------------------------------------------------------------------------
// The quantizer of one chunk of groups

/// Storage of a per-group vector (scales or zeros): plain in meta_dtype, or 8-bit codes with
/// per-kMetaGroup fp32 scale/zero.
struct MetaStore {
  torch::Tensor plain;  // [n] meta dtype, or undefined
  torch::Tensor q;      // [n] uint8, or undefined
  torch::Tensor scale;  // [ceil(n / kMetaGroup)] fp32
  torch::Tensor zero;   // [ceil(n / kMetaGroup)] fp32
  /// The fp32 values the stored form decodes to.
  torch::Tensor decoded;
};

/// Result of quantizing a chunk of groups X[c, g].
struct GroupQuant {
  MetaStore scale;      // decoded: fp32 [c], > 0
  MetaStore zero;       // decoded: fp32 [c]
  torch::Tensor codes;  // uint8 [c, g]
};

/// Quantizes groups X[c, g] (fp32, one group per row). Blocks of kMetaGroup rows share an 8-bit
/// meta quantizer, so a chunk must start at a multiple of kMetaGroup groups. The codes are
/// computed with the decoded (stored) scale and zero, so dequantization reproduces exactly what
/// the solver measured. With p.optimize the zero-points come from HQQ's proximal solver.
GroupQuant quantize_groups(const torch::Tensor& x, const HqqParams& p);

/// Sum over each row of X[c, g] of the squared error of quantizing with decoded scale `s` [c],
/// inverse scale `inv` [c] and zero `z` [c] (all fp32).
torch::Tensor group_sq_error(const torch::Tensor& x, const torch::Tensor& s,
                             const torch::Tensor& inv, const torch::Tensor& z, int max_code);

}  // namespace qtune::hqq
