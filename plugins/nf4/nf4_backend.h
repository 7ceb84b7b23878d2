// The nf4 quantization backend: 4-bit NormalFloat with optional double quantization, stored in
// bitsandbytes' layout and key names (see nf4_codec.h for the format).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "nf4_codec.h"
#include "qtune/quantized_weight.h"

namespace qtune::nf4 {

/// Key of the packed quant_state JSON, as bitsandbytes names it (`QuantState.as_dict(packed=True)`
/// prefixed with the parameter name).
constexpr const char* kQuantStateKey = "weight.quant_state.bitsandbytes__nf4";

/// One NF4 weight. Tensors live on one device; on CPU the fast kernels are used, elsewhere the
/// tensor-op path.
class Nf4Weight : public QuantizedWeight {
 public:
  /// `options` are the resolved plugin options; `source_dtype` the dtype name of the original
  /// W ("float32", "bfloat16", ...), recorded in the quant_state JSON.
  Nf4Weight(const Layout& layout, Packed packed, Json options, std::string source_dtype);

  std::string backend() const override { return "nf4"; }
  int64_t out_features() const override { return layout_.out; }
  int64_t in_features() const override { return layout_.in; }

  torch::Tensor dequantize(torch::ScalarType dtype, torch::Device device) const override;
  torch::Tensor dequantize_rows(int64_t begin, int64_t end, torch::ScalarType dtype,
                                torch::Device device) const override;
  /// CPU: row tiles dequantized by the kernel into one reused buffer and multiplied straight
  /// into the output; other devices: the default tiled path.
  torch::Tensor linear(const torch::Tensor& x) const override;
  torch::Tensor linear_grad_input(const torch::Tensor& g) const override;

  TensorState state() const override;
  /// Every state tensor and the metadata, except the code tables shared by all NF4 weights of
  /// the process (they exist once, not once per weight).
  int64_t nbytes() const override;
  void to(torch::Device device) override;
  torch::Device device() const override { return packed_.data.device(); }

  const Layout& layout() const { return layout_; }
  const Packed& packed() const { return packed_; }

 private:
  bool cpu_kernel_ok(torch::ScalarType dtype) const;
  /// The packed quant_state JSON (bitsandbytes' weight.quant_state.bitsandbytes__nf4), built
  /// from the layout on demand.
  torch::Tensor quant_state_bytes() const;

  Layout layout_;
  Packed packed_;
  Json options_;
  std::string source_dtype_;
};

/// The plugin's factory.
class Nf4Backend : public QuantBackend {
 public:
  std::string name() const override { return "nf4"; }
  std::vector<OptionSpec> option_schema() const override;
  Json check_options(const Json& user, const std::string& context) const override;
  double error_bound(const Json& options) const override;
  std::unique_ptr<QuantizedWeight> quantize(const torch::Tensor& w,
                                            const Json& options) const override;
  std::unique_ptr<QuantizedWeight> load(const TensorState& state) const override;

  /// quantize() with the path chosen explicitly (tests compare the two): `use_cpu_kernel`
  /// false forces the tensor-op path, which processes `chunk_elems` elements at a time.
  std::unique_ptr<Nf4Weight> quantize_with(const torch::Tensor& w, const Json& options,
                                           bool use_cpu_kernel,
                                           int64_t chunk_elems = int64_t{1} << 20) const;
};

}  // namespace qtune::nf4
