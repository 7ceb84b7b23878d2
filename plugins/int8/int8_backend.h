// Weight-only symmetric int8 quantization as a qtune backend: per output row (or per group of
// `group_size` input columns within a row), scale = absmax / 127, q = round(w / scale) clamped to
// [-127, 127]; W ≈ q * scale, dequantized on the fly in the compute dtype.
//
// Plugin-internal; the registry sees Int8Backend through the entry point in int8_plugin.cpp.
// Declared in a header for the unit tests, which link int8_objects directly. The folder follows
// the one plugin layout: int8_backend.{h,cpp} (the scheme is simple enough to need no separate
// codec or kernels) and int8_plugin.cpp (the entry point).
//
// State (format_version 1), W[out, in] with G = 1 (group_size 0) or ceil(in / group_size):
//   "weight"       int8 [out, in]   the codes, row-major (the last group of a row may be short)
//   "weight.scale" fp32 or bf16 [out, G]   scale of each row / group (0 for an all-zero group)
//   meta {"backend": "int8", "format_version": 1, "shape": [out, in], "options": {...}}
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qtune/quantized_weight.h"

namespace qtune::int8 {

/// Resolved, validated options.
struct Int8Params {
  int64_t group_size = 0;            // 0 = one scale per output row
  std::string scale_dtype = "fp32";  // "fp32" or "bf16"

  torch::ScalarType scale_scalar_type() const {
    return scale_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
  }
  /// Scales per row for `in` input features.
  int64_t groups_per_row(int64_t in) const {
    return group_size > 0 ? (in + group_size - 1) / group_size : 1;
  }
  Json to_json() const { return Json{{"group_size", group_size}, {"scale_dtype", scale_dtype}}; }
};

std::vector<OptionSpec> option_schema();
/// Resolves and checks options (ranges are declared in the schema); throws UserError naming
/// `<context>.<key>` and what is allowed.
Int8Params parse_params(const Json& options, const std::string& context = "quant.options");

class Int8Weight final : public QuantizedWeight {
 public:
  /// `q` int8 [out, in], `scale` [out, G] in params.scale_dtype, same device, validated.
  Int8Weight(Int8Params params, torch::Tensor q, torch::Tensor scale);

  std::string backend() const override { return "int8"; }
  int64_t out_features() const override { return q_.size(0); }
  int64_t in_features() const override { return q_.size(1); }
  torch::Tensor dequantize(torch::ScalarType dtype, torch::Device device) const override;
  torch::Tensor dequantize_rows(int64_t begin, int64_t end, torch::ScalarType dtype,
                                torch::Device device) const override;
  /// Per-row scales with an fp32/bf16/fp64 x: y = (x @ q^T) * scale, q converted to x's dtype
  /// one row tile at a time (exact: |q| <= 127), the scale applied to the much smaller output.
  /// Otherwise (grouped scales, fp16 whose range x @ q^T could overflow) the default tiled path.
  torch::Tensor linear(const torch::Tensor& x) const override;
  /// Per-row scales: grad_x = (g * scale) @ q, tiled the same way; otherwise the default.
  torch::Tensor linear_grad_input(const torch::Tensor& g) const override;
  TensorState state() const override;
  void to(torch::Device device) override;
  torch::Device device() const override { return q_.device(); }

  const Int8Params& params() const { return params_; }

 private:
  bool fast_path(torch::ScalarType dtype) const;

  Int8Params params_;
  torch::Tensor q_;      // int8 [out, in]
  torch::Tensor scale_;  // [out, G]
};

class Int8Backend final : public QuantBackend {
 public:
  std::string name() const override { return "int8"; }
  std::vector<OptionSpec> option_schema() const override { return int8::option_schema(); }
  Json check_options(const Json& user, const std::string& context) const override;
  double error_bound(const Json& options) const override;
  std::unique_ptr<QuantizedWeight> quantize(const torch::Tensor& w,
                                            const Json& options) const override;
  std::unique_ptr<QuantizedWeight> load(const TensorState& state) const override;
};

}  // namespace qtune::int8
