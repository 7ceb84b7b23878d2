// The one autograd function for a frozen quantized base weight, and the module that holds one.
// Forward computes x @ W^T through QuantizedWeight::linear; backward computes only
// grad_x = grad_y @ W through linear_grad_input. Nothing is saved for backward but the weight
// handle: no input, no dequantized copy.
#pragma once

#include <memory>

#include <torch/torch.h>

#include "qtune/export.h"
#include "qtune/quantized_weight.h"

namespace qtune {

/// y = QuantizedLinearFunction::apply(x, weight): differentiable in x only. `weight` must stay
/// alive until backward has run (the owning module keeps it).
struct QTUNE_API QuantizedLinearFunction
    : public torch::autograd::Function<QuantizedLinearFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               int64_t weight_handle);
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out);
  /// The public entry point.
  static torch::Tensor run(const torch::Tensor& x, const std::shared_ptr<QuantizedWeight>& w);
};

/// A frozen quantized projection. Its packed tensors are registered as buffers (key dots become
/// underscores), so Module::to(device) and checkpoints see them and the optimizer does not.
class QTUNE_API QuantizedLinearImpl : public torch::nn::Module {
 public:
  explicit QuantizedLinearImpl(std::shared_ptr<QuantizedWeight> weight);
  torch::Tensor forward(const torch::Tensor& x);
  const std::shared_ptr<QuantizedWeight>& weight() const { return weight_; }

 private:
  std::shared_ptr<QuantizedWeight> weight_;
};
TORCH_MODULE(QuantizedLinear);

}  // namespace qtune
