// Activation checkpointing: run a computation without keeping its activations and run it again
// in backward, with the random-number state it first saw (dropout draws the same masks).
#pragma once

#include <functional>
#include <vector>

#include <torch/torch.h>

#include "qtune/export.h"

namespace qtune {

/// The computation to checkpoint: any differentiable function of `inputs` (and of the tensors
/// listed as `params`, which it reads from elsewhere, e.g. a module's parameters).
using RecomputeFn = std::function<torch::Tensor(const std::vector<torch::Tensor>& inputs)>;

/// y = fn(inputs) as one autograd node that saves only `inputs`. In backward, fn runs again with
/// gradients on (same generator states of the CPU and of the inputs' device, restored afterwards)
/// and the gradient of y flows to every input and every `params` tensor that requires grad.
/// Listing `params` is what makes y require grad when no input does: under LoRA the first
/// decoder layer's input comes from a frozen embedding, and only its adapters train. fn must
/// stay callable until backward has run; outside grad mode fn is simply called. A tensor listed
/// twice counts once.
QTUNE_API torch::Tensor recompute_in_backward(RecomputeFn fn, std::vector<torch::Tensor> inputs,
                                              std::vector<torch::Tensor> params);

/// Whether this thread is running a checkpointed computation again in backward (inside
/// recompute_in_backward's second call of fn): what tells a recompute from the first forward,
/// which calls the same functions in the same order (the sharded base's prefetch uses it).
QTUNE_API bool in_recompute();

/// The states of the default generators a computation on `device` draws from: the CPU's, and the
/// device's own when it is not the CPU. restore() puts them back.
class QTUNE_API RngSnapshot {
 public:
  explicit RngSnapshot(const torch::Device& device);
  void restore() const;

 private:
  std::vector<std::pair<torch::Device, torch::Tensor>> states_;
};

}  // namespace qtune
