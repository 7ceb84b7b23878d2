// The int4 example backend: Int4Weight (one quantized matrix, a QuantizedWeight) and Int4Backend
// (the plugin's factory, a QuantBackend). The format is in int4_codec.h; the state is
//   "weight"        uint8 [out, ceil(in / 2)]  the packed codes, row-major
//   "weight.scale"  fp32  [out, G]             scale of each group (0 for an all-zero group)
//   meta {"backend": "int4", "format_version": 1, "shape": [out, in], "options": {"group_size"}}
// with G = ceil(in / group_size) (1 when group_size is 0).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "qtune/quantized_weight.h"

namespace int4_example {

constexpr const char* kName = "int4";
constexpr int kFormatVersion = 1;

class Int4Weight final : public qtune::QuantizedWeight {
 public:
  /// `packed` uint8 [out, ceil(in / 2)], `scale` fp32 [out, G], same device, already validated.
  Int4Weight(int64_t group_size, int64_t in, torch::Tensor packed, torch::Tensor scale);

  std::string backend() const override { return kName; }
  int64_t out_features() const override { return packed_.size(0); }
  int64_t in_features() const override { return in_; }
  torch::Tensor dequantize(torch::ScalarType dtype, torch::Device device) const override;
  torch::Tensor dequantize_rows(int64_t begin, int64_t end, torch::ScalarType dtype,
                                torch::Device device) const override;
  qtune::TensorState state() const override;
  void to(torch::Device device) override;
  torch::Device device() const override { return packed_.device(); }

 private:
  int64_t group_size_;
  int64_t in_;
  torch::Tensor packed_;  // uint8 [out, ceil(in / 2)]
  torch::Tensor scale_;   // fp32 [out, G]
};

class Int4Backend final : public qtune::QuantBackend {
 public:
  std::string name() const override { return kName; }
  std::vector<qtune::OptionSpec> option_schema() const override;
  double error_bound(const qtune::Json& options) const override;
  std::unique_ptr<qtune::QuantizedWeight> quantize(const torch::Tensor& w,
                                                   const qtune::Json& options) const override;
  std::unique_ptr<qtune::QuantizedWeight> load(const qtune::TensorState& state) const override;
};

}  // namespace int4_example
