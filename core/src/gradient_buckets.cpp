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
  for (auto& b : buckets_) {
    b.waiting = 0;
    for (int64_t i : b.members) b.waiting += expected_[i] > 0 ? 1 : 0;
  }
  // The last backward accumulates straight into the buckets: each .grad becomes its slot.
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) attach(static_cast<int64_t>(i));
  // The first armed backward only counts: until then nothing is known to be complete early.
  if (calibrated_) send_ready();
}

torch::Tensor GradientBuckets::slot(int64_t param) const {
  const auto& p = params_[param];
  return buckets_[bucket_of_[param]].flat.narrow(0, offset_of_[param], p.numel());
}

bool GradientBuckets::holds_gradient(int64_t param) const {
  const auto& g = params_[param].grad();
  return g.defined() && g.data_ptr() == slot(param).data_ptr();
}

void GradientBuckets::attach(int64_t param) {
  if (holds_gradient(param)) return;
  auto& p = params_[param];
  auto s = slot(param);
  if (p.grad().defined())
    s.copy_(p.grad().reshape({p.numel()}));
  else
    s.zero_();
  // A plain tensor over the slot's memory, not an autograd view of the flat buffer: LibTorch
  // 1.13's zero_grad() detaches .grad in place, which a view refuses.
  torch::Tensor keep = buckets_[bucket_of_[param]].flat;
  p.mutable_grad() = torch::from_blob(
      s.data_ptr(), p.sizes(), [keep](void*) mutable { keep.reset(); }, s.options());
}

void GradientBuckets::on_gradient(int64_t param, const torch::Tensor& grad) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_ || !grad.defined()) return;
  const int64_t k = ++received_[param];
  if (!calibrated_) return;
  try {
    // AccumulateGrad adds a gradient into .grad after its hooks ran, and the engine runs one
    // node at a time: a bucket completed by an earlier hook has all its sums by now.
    send_ready();
    Bucket& b = buckets_[bucket_of_[param]];
    if (b.sent) {
      if (late_param_ < 0) late_param_ = param;
      return;
    }
    // Sent no earlier than the next gradient's hook (or finish()), once this one is added.
    if (k == expected_[param]) --b.waiting;
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
  // A .grad that is not its slot (replaced since arm(), or the unarmed path) is copied in.
  torch::NoGradGuard no_grad;
  for (int64_t i : b.members) attach(i);
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
  // Every .grad is its slot, which now holds the sum.
}

}  // namespace qtune
