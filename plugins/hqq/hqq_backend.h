// The HQQ weight and backend (layout and conventions in hqq_codec.h).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "hqq_codec.h"
#include "qtune/quantized_weight.h"

namespace qtune::hqq {

class HqqWeight final : public QuantizedWeight {
 public:
  /// Tensors as described in the file comment; `params` resolved; shapes already validated.
  HqqWeight(int64_t out, int64_t in, HqqParams params, std::map<std::string, torch::Tensor> t);

  std::string backend() const override { return "hqq"; }
  int64_t out_features() const override { return out_; }
  int64_t in_features() const override { return in_; }
  torch::Tensor dequantize(torch::ScalarType dtype, torch::Device device) const override;
  torch::Tensor dequantize_rows(int64_t begin, int64_t end, torch::ScalarType dtype,
                                torch::Device device) const override;
  TensorState state() const override;
  void to(torch::Device device) override;
  torch::Device device() const override { return tensors_.at("W_q").device(); }

  const HqqParams& params() const { return params_; }
  int64_t num_groups() const { return groups_; }
  /// Decoded fp32 scale and zero of groups [k0, k1) on the weight's device.
  std::pair<torch::Tensor, torch::Tensor> group_params(int64_t k0, int64_t k1) const;
  /// Dequantized flat elements [f0, f1) of W (row-major), fp32 on the weight's device, by
  /// tensor ops (any device, any layout).
  torch::Tensor dequantize_flat(int64_t f0, int64_t f1) const;
  /// Tests: make dequantize_rows() take the tensor-op path even where the CPU kernel applies
  /// (axis 1 on CPU); both must agree bit for bit.
  void set_force_tensor_ops(bool on) { force_tensor_ops_ = on; }
  /// Tests: let the CPU kernel use AVX-512 where the CPU has it (the default), or only its
  /// portable loop, as on CPUs without it.
  void set_cpu_kernel_simd(bool on) { simd_ = on; }

 private:
  torch::Tensor decode_meta(const std::string& key, int64_t k0, int64_t k1) const;
  bool use_cpu_kernel() const;

  int64_t out_, in_;
  HqqParams params_;
  int64_t group_;   // effective group size g
  int64_t groups_;  // G = ceil(N / g)
  std::map<std::string, torch::Tensor> tensors_;
  bool force_tensor_ops_ = false;
  bool simd_ = true;
};

class HqqBackend final : public QuantBackend {
 public:
  std::string name() const override { return "hqq"; }
  std::vector<OptionSpec> option_schema() const override { return hqq::option_schema(); }
  Json check_options(const Json& user, const std::string& context) const override;
  double error_bound(const Json& options) const override;
  std::unique_ptr<QuantizedWeight> quantize(const torch::Tensor& w,
                                            const Json& options) const override;
  std::unique_ptr<QuantizedWeight> load(const TensorState& state) const override;
};

}  // namespace qtune::hqq
