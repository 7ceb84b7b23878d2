// Gradient all-reduce over flat buckets overlapped with backward (see gradient_buckets.h).
//
// Facts taken from PyTorch: a hook registered on a leaf tensor runs as a pre-hook of its
// AccumulateGrad node, with the gradient autograd is about to add to .grad
// (torch/csrc/autograd/functions/accumulate_grad.h); the engine sums every use of a tensor in one
// graph before running that node once, so tied weights see one gradient per backward. DDP's
// reducer (torch/csrc/distributed/c10d/reducer.cpp) likewise buckets parameters in reverse order
// and launches buckets in order from such hooks.
#include "qtune/gradient_buckets.h"

#include <algorithm>
#include <exception>
#include <stdexcept>
#include <string>

namespace qtune {

GradientBuckets::GradientBuckets(std::vector<torch::Tensor> params, int64_t bucket_bytes)
    : params_(std::move(params)) {
  TORCH_CHECK(bucket_bytes > 0, "bucket_bytes must be > 0");
  const int64_t n = static_cast<int64_t>(params_.size());
  bucket_of_.assign(n, -1);
  offset_of_.assign(n, 0);
  // Parameters in reverse order share a bucket while they have one dtype and device and it is
  // not full; a parameter larger than a bucket gets one of its own.
  Bucket current;
  int64_t current_bytes = 0;
  auto close = [&] {
    if (current.members.empty()) return;
    int64_t numel = 0;
    for (int64_t i : current.members) {
      offset_of_[i] = numel;
      numel += params_[i].numel();
      bucket_of_[i] = static_cast<int64_t>(buckets_.size());
    }
    const auto& p0 = params_[current.members.front()];
    current.flat = torch::zeros({numel}, p0.options().requires_grad(false));
    bytes_ += numel * p0.element_size();
    buckets_.push_back(std::move(current));
    current = Bucket{};
    current_bytes = 0;
  };
  for (int64_t i = n - 1; i >= 0; --i) {
    const auto& p = params_[i];
    const int64_t b = p.numel() * p.element_size();
    if (!current.members.empty()) {
      const auto& q = params_[current.members.front()];
      if (q.scalar_type() != p.scalar_type() || q.device() != p.device() ||
          current_bytes + b > bucket_bytes)
        close();
    }
    current.members.push_back(i);
    current_bytes += b;
  }
  close();

  expected_.assign(n, 0);
  received_.assign(n, 0);
  filled_.assign(n, false);
  for (int64_t i = 0; i < n; ++i)
    hooks_.push_back(params_[i].register_hook(
        [this, i](const torch::Tensor& grad) { on_gradient(i, grad); }));
}

GradientBuckets::~GradientBuckets() {
  for (size_t i = 0; i < hooks_.size(); ++i) params_[i].remove_hook(hooks_[i]);
}

void GradientBuckets::arm(ProcessGroup& group) {
  if (group.world_size() == 1) return;
  std::lock_guard<std::mutex> lock(mutex_);
  group_ = &group;
  armed_ = true;
  std::fill(received_.begin(), received_.end(), 0);
  std::fill(filled_.begin(), filled_.end(), false);
  for (auto& b : buckets_) {
    b.waiting = 0;
    for (int64_t i : b.members) b.waiting += expected_[i] > 0 ? 1 : 0;
  }
  // The first armed backward only counts: until then nothing is known to be complete early.
  if (calibrated_) send_ready();
}

void GradientBuckets::on_gradient(int64_t param, const torch::Tensor& grad) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_ || !grad.defined()) return;
  const int64_t k = ++received_[param];
  if (!calibrated_) return;
  Bucket& b = buckets_[bucket_of_[param]];
  if (b.sent) {
    if (late_param_ < 0) late_param_ = param;
    return;
  }
  try {
    // The hook runs before AccumulateGrad adds `grad`: the slot takes what .grad will hold.
    torch::NoGradGuard no_grad;
    const auto& p = params_[param];
    auto slot = b.flat.narrow(0, offset_of_[param], p.numel()).view(p.sizes());
    if (p.grad().defined())
      torch::add_out(slot, p.grad(), grad);
    else
      slot.copy_(grad);
    filled_[param] = true;
    if (k == expected_[param] && --b.waiting == 0) send_ready();
  } catch (...) {
    // Not thrown through autograd's engine (which may rewrap it): finish() rethrows it.
    if (!error_) error_ = std::current_exception();
  }
}

void GradientBuckets::send_ready() {
  while (next_ < buckets_.size() && buckets_[next_].waiting == 0) {
    send(buckets_[next_]);
    ++next_;
    ++sent_early_;
  }
}

void GradientBuckets::send(Bucket& b) {
  torch::NoGradGuard no_grad;
  for (int64_t i : b.members) {
    if (filled_[i]) continue;
    const auto& p = params_[i];
    auto slot = b.flat.narrow(0, offset_of_[i], p.numel());
    if (p.grad().defined())
      slot.copy_(p.grad().reshape({p.numel()}));
    else
      slot.zero_();
  }
  b.sent = group_->all_reduce_sum_async(b.flat, "the gradient all-reduce");
}

void GradientBuckets::finish(ProcessGroup& group) {
  std::unique_lock<std::mutex> lock(mutex_);
  const bool was_armed = armed_;
  armed_ = false;
  sent_during_backward_ = sent_early_;
  sent_early_ = 0;
  if (was_armed && !calibrated_) {
    expected_ = received_;
    calibrated_ = true;
  }
  if (group.world_size() == 1) return;
  group_ = &group;
  const std::exception_ptr error = error_;
  const int64_t late = late_param_;
  error_ = nullptr;
  late_param_ = -1;
  auto reset = [&] {
    for (auto& b : buckets_) b.sent.reset();  // waits for any still in flight, quietly
    next_ = 0;
    std::fill(filled_.begin(), filled_.end(), false);
  };
  if (error) {
    reset();
    std::rethrow_exception(error);
  }
  try {
    for (; next_ < buckets_.size(); ++next_) send(buckets_[next_]);
    for (auto& b : buckets_) b.sent->wait();
  } catch (...) {
    reset();
    throw;
  }
  reset();
  if (late >= 0)
    throw std::logic_error(
        "gradient all-reduce: trainable parameter " + std::to_string(late) +
        " received a gradient after its bucket was sent (more gradients in this backward than "
        "in the first step's): the summed gradients are wrong");
  torch::NoGradGuard no_grad;
  for (auto& b : buckets_) {
    for (int64_t i : b.members) {
      auto& p = params_[i];
      auto sum = b.flat.narrow(0, offset_of_[i], p.numel()).view(p.sizes());
      if (p.grad().defined())
        p.mutable_grad().copy_(sum);
      else
        p.mutable_grad() = sum.clone();
    }
  }
}

}  // namespace qtune
