// Activation checkpointing (see recompute.h): a reentrant autograd function that replays its
// computation in backward and returns the gradients to the engine.
#include "qtune/recompute.h"

#include <mutex>
#include <unordered_set>

#include <ATen/Context.h>

namespace qtune {

RngSnapshot::RngSnapshot(const torch::Device& device) {
  std::vector<torch::Device> devices{torch::Device(torch::kCPU)};
  if (!device.is_cpu()) devices.push_back(device);
  for (const auto& d : devices) {
    auto gen = at::globalContext().defaultGenerator(d);
    std::lock_guard<std::mutex> lock(gen.mutex());
    states_.emplace_back(d, gen.get_state());
  }
}

void RngSnapshot::restore() const {
  for (const auto& [d, state] : states_) {
    auto gen = at::globalContext().defaultGenerator(d);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
  }
}

namespace {

thread_local int recompute_depth = 0;

// Marks the thread as recomputing for in_recompute(), also when fn throws.
struct RecomputeScope {
  RecomputeScope() { ++recompute_depth; }
  ~RecomputeScope() { --recompute_depth; }
  RecomputeScope(const RecomputeScope&) = delete;
  RecomputeScope& operator=(const RecomputeScope&) = delete;
};

// Holds the function in the autograd context (saved_data keeps IValues; a capsule carries it).
struct RecomputeState : torch::CustomClassHolder {
  RecomputeFn fn;
  RngSnapshot rng;
  size_t num_inputs = 0;
  std::vector<bool> input_requires_grad;
  // The trainable tensors fn reads (kept here, not saved: fn finds them itself, and gradients
  // must be taken with respect to these very leaves).
  std::vector<torch::Tensor> params;
  RecomputeState(RecomputeFn f, const torch::Device& device) : fn(std::move(f)), rng(device) {}
};

// The inputs and the params arrive as one list, so the engine routes a gradient to each of
// them; the function itself travels in a capsule. PEFT users meet the problem this solves as
// `enable_input_require_grads` / `use_reentrant=False`: a reentrant checkpoint whose only
// tensor inputs do not require grad has no edge to backpropagate through, because the
// parameters it trains are invisible to autograd. Here they are inputs.
struct RecomputeFunction : public torch::autograd::Function<RecomputeFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList tensors,
                               c10::intrusive_ptr<RecomputeState> state) {
    std::vector<torch::Tensor> inputs(tensors.begin(), tensors.begin() + state->num_inputs);
    for (const auto& t : inputs) state->input_requires_grad.push_back(t.requires_grad());
    ctx->save_for_backward(inputs);
    ctx->saved_data["state"] = c10::IValue::make_capsule(state);
    // Function::apply runs forward with grad mode off: nothing of fn's graph is kept.
    return state->fn(inputs);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto state = c10::static_intrusive_pointer_cast<RecomputeState>(
        ctx->saved_data["state"].toCapsule());
    const auto saved = ctx->get_saved_variables();
    std::vector<torch::Tensor> inputs;
    std::vector<torch::Tensor> wrt;  // what gradients are asked for, in argument order
    std::vector<size_t> wrt_index;
    for (size_t i = 0; i < saved.size(); ++i) {
      auto x = saved[i].detach();
      if (state->input_requires_grad[i]) {
        x.requires_grad_(true);
        wrt.push_back(x);
        wrt_index.push_back(i);
      }
      inputs.push_back(x);
    }
    const auto& params = state->params;
    for (size_t j = 0; j < params.size(); ++j) {
      wrt.push_back(params[j]);
      wrt_index.push_back(saved.size() + j);
    }

    torch::Tensor y;
    {
      const RngSnapshot now(saved.empty() ? torch::Device(torch::kCPU) : saved[0].device());
      state->rng.restore();
      torch::AutoGradMode enable(true);
      const RecomputeScope scope;
      y = state->fn(inputs);
      now.restore();
    }
    torch::autograd::variable_list grads(saved.size() + params.size() + 1);  // + the capsule
    if (!y.requires_grad() || wrt.empty()) return grads;  // e.g. every adapter disabled
    auto g = torch::autograd::grad({y}, wrt, {grad_out[0]}, /*retain_graph=*/false,
                                   /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0; i < wrt.size(); ++i) grads[wrt_index[i]] = g[i];
    return grads;
  }
};

}  // namespace

bool in_recompute() { return recompute_depth > 0; }

torch::Tensor recompute_in_backward(RecomputeFn fn, std::vector<torch::Tensor> inputs,
                                    std::vector<torch::Tensor> params) {
  if (!torch::GradMode::is_enabled()) return fn(inputs);
  // Each trainable tensor once: a tensor listed twice (a tied head, which is also the
  // embedding) would receive its gradient twice.
  std::vector<torch::Tensor> trainable;
  std::unordered_set<const void*> seen;
  for (auto& p : params)
    if (p.defined() && p.requires_grad() && seen.insert(p.unsafeGetTensorImpl()).second)
      trainable.push_back(std::move(p));
  const auto device = inputs.empty() ? torch::Device(torch::kCPU) : inputs[0].device();
  auto state = c10::make_intrusive<RecomputeState>(std::move(fn), device);
  state->num_inputs = inputs.size();
  state->params = trainable;
  std::vector<torch::Tensor> all = std::move(inputs);
  all.insert(all.end(), trainable.begin(), trainable.end());
  return RecomputeFunction::apply(at::TensorList(all), state);
}

}  // namespace qtune
