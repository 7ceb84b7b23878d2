// QuantizedLinearFunction and QuantizedLinear (see quantized_linear.h).
#include "qtune/quantized_linear.h"

#include <algorithm>

namespace qtune {

torch::Tensor QuantizedLinearFunction::forward(torch::autograd::AutogradContext* ctx,
                                               const torch::Tensor& x, int64_t weight_handle) {
  // The handle is the raw pointer of a QuantizedWeight owned by the calling module; saving it as
  // an integer keeps the graph free of tensors (nothing else is saved for backward).
  ctx->saved_data["w"] = weight_handle;
  const auto* w = reinterpret_cast<const QuantizedWeight*>(weight_handle);
  return w->linear(x);
}

torch::autograd::variable_list QuantizedLinearFunction::backward(
    torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_out) {
  const auto* w = reinterpret_cast<const QuantizedWeight*>(ctx->saved_data["w"].toInt());
  return {w->linear_grad_input(grad_out[0]), torch::Tensor()};
}

torch::Tensor QuantizedLinearFunction::run(const torch::Tensor& x,
                                           const std::shared_ptr<QuantizedWeight>& w) {
  return apply(x, reinterpret_cast<int64_t>(w.get()));
}

QuantizedLinearImpl::QuantizedLinearImpl(std::shared_ptr<QuantizedWeight> weight)
    : weight_(std::move(weight)) {
  for (auto& [key, tensor] : held_tensors(*weight_)) {
    std::string name = key;
    std::replace(name.begin(), name.end(), '.', '_');
    register_buffer(name, tensor);
  }
}

torch::Tensor QuantizedLinearImpl::forward(const torch::Tensor& x) {
  return QuantizedLinearFunction::run(x, weight_);
}

}  // namespace qtune
