// A small correct quantization backend written with the SDK kit (qtune/plugin_kit.h,
// qtune/state_layout.h), and deliberately broken variants of it that the conformance suite must
// fail (tests/sdk/test_conformance_catches.cpp). The code is compiled once; each variant is a
// plugin library of its own (kit_plugin.cpp built with QTUNE_SDK_NAME = "kit_<variant>"), and the
// name selects the defect:
//   kit_ok             correct: must pass the conformance suite
//   kit_copy_state     state() hands out a copy of its codes, not the held tensor
//   kit_loose_bound    error_bound() 20x the error it achieves
//   kit_bad_grad       linear_grad_input() is 5% off g @ W
//   kit_lax_load       load() checks only that the keys exist, not dtypes or shapes
//   kit_threads        quantize() depends on the intra-op thread count
//   kit_throw_options  rejects odd bits with std::invalid_argument, not a UserError
// Scheme: symmetric absmax, `bits` (3..8) per code, one fp32 scale per group of `group_size`
// input columns (0 = per row): q = round(w / s), s = absmax / qmax; codes int8 [out, in].
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "qtune/quantized_weight.h"

namespace kit_test {

enum class Defect { kNone, kCopyState, kLooseBound, kBadGrad, kLaxLoad, kThreads, kThrowOptions };

class KitBackend : public qtune::QuantBackend {
 public:
  /// `name` is the plugin's name; its suffix after "kit_" selects the defect.
  explicit KitBackend(std::string name);
  std::string name() const override { return name_; }
  std::vector<qtune::OptionSpec> option_schema() const override;
  qtune::Json check_options(const qtune::Json& user, const std::string& context) const override;
  double error_bound(const qtune::Json& options) const override;
  std::unique_ptr<qtune::QuantizedWeight> quantize(const torch::Tensor& w,
                                                   const qtune::Json& options) const override;
  std::unique_ptr<qtune::QuantizedWeight> load(const qtune::TensorState& state) const override;

 private:
  std::string name_;
  Defect defect_;
};

}  // namespace kit_test
