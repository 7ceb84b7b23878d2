// Data parallelism's gradient all-reduce: the trainable parameters' gradients summed over the
// ranks in flat buckets, each bucket sent while backward is still computing the gradients of the
// ones after it (as PyTorch's DDP reducer does), then written back into every .grad.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <vector>

#include "qtune/export.h"
#include "qtune/process_group.h"

namespace qtune {

/// The gradients of a fixed list of trainable parameters summed over the ranks of a process group
/// in flat buckets of about `bucket_bytes` each: one collective per bucket, each bucket a
/// contiguous buffer allocated once, holding consecutive parameters of one dtype and device in
/// reverse order (the order backward computes their gradients), so bucket 0 is filled first.
/// Buckets are sent strictly in index order, which every rank therefore issues identically.
///
/// One optimizer step on one rank:
///
///     for each micro-batch m: { if (m is the last this rank runs backward for) arm();
///                               loss_m.backward(); }
///     finish(group);  // every .grad now holds the sum over the ranks
///
/// arm() makes each .grad a tensor over its bucket slot (copying what earlier micro-batches
/// accumulated), so the armed backward accumulates straight into the buckets and no second copy
/// of the gradients exists (DDP's gradient_as_bucket_view). While armed, a hook on each parameter
/// counts its gradients of that backward (it runs before autograd adds one to .grad); once a
/// bucket and all before it have every gradient added (seen at the next gradient's hook, the
/// engine running one node at a time) they are sent. finish() sends what is left (everything,
/// when nothing was armed: a rank whose micro-batches were all skipped still issues the same
/// collectives; a .grad that is not its slot is copied in first) and waits for all: every .grad
/// is then its slot, holding the sum. A parameter without a gradient contributes zeros and
/// receives the sum, so every rank's optimizer sees the same. Zeroing a .grad in place or setting
/// it to none (LibTorch 1.13's and 2.x's zero_grad()) are both fine.
///
/// How many gradients of one backward a parameter's hook sees (1 even for tied weights: autograd
/// sums the uses before accumulating; more where a nested autograd::grad runs tensor hooks too,
/// as LibTorch 2.x does inside activation checkpointing) is learnt in the first armed backward,
/// which sends nothing early. Should a later backward deliver a gradient for a parameter whose
/// bucket was already sent, finish() throws std::logic_error after the collectives are done: the
/// graph changed between steps, which the trainer never does.
///
/// Not thread-safe across calls; the hooks themselves may run on autograd's device threads. The
/// parameters must outlive this object (its destructor removes the hooks).
class QTUNE_API GradientBuckets {
 public:
  GradientBuckets(std::vector<torch::Tensor> params, int64_t bucket_bytes);
  ~GradientBuckets();
  GradientBuckets(const GradientBuckets&) = delete;
  GradientBuckets& operator=(const GradientBuckets&) = delete;

  /// Call right before the last backward of a step on this rank: its gradients are sent as
  /// buckets complete. At most once per step; `group` is the one finish() gets.
  void arm(ProcessGroup& group);
  /// Call after the step's last backward: sends the buckets not sent yet, in order, waits for
  /// every one (UserError naming a lost rank, as ProcessGroup's collectives) and writes the sums
  /// into each parameter's .grad. A no-op for a world of one.
  void finish(ProcessGroup& group);
  /// The same without overlap: sums every parameter's .grad as it is now (finish() unarmed).
  void all_reduce(ProcessGroup& group) { finish(group); }

  /// Number of buckets and total bytes reduced per step.
  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }
  int64_t bytes() const { return bytes_; }
  /// Buckets the last finish() found already sent during backward (for tests and measurements).
  int64_t sent_during_backward() const { return sent_during_backward_; }
  /// Whether parameter `param`'s .grad is its bucket slot (true after finish()).
  bool holds_gradient(int64_t param) const;

 private:
  struct Bucket {
    std::vector<int64_t> members;  // indices into params_, in bucket order
    torch::Tensor flat;
    int64_t waiting = 0;  // members whose gradients of the armed backward are still to come
    std::unique_ptr<PendingCollective> sent;
  };
  void on_gradient(int64_t param, const torch::Tensor& grad);
  void send_ready();          // sends the complete buckets from next_ on, in order
  void send(Bucket& bucket);  // attaches every member, starts the all-reduce
  torch::Tensor slot(int64_t param) const;  // its elements of its bucket's flat
  void attach(int64_t param);  // makes .grad its slot, keeping the value

  std::vector<torch::Tensor> params_;
  std::vector<Bucket> buckets_;
  std::vector<int64_t> bucket_of_;  // param -> bucket
  std::vector<int64_t> offset_of_;  // param -> its first element in its bucket's flat
  std::vector<unsigned> hooks_;     // param -> its hook's handle
  int64_t bytes_ = 0;

  // One armed backward's state, guarded by mutex_ (hooks may run on autograd's threads).
  std::mutex mutex_;
  ProcessGroup* group_ = nullptr;  // while armed
  bool armed_ = false;
  bool calibrated_ = false;       // expected_ is known
  std::vector<int64_t> expected_;  // param -> gradients per backward (learnt)
  std::vector<int64_t> received_;  // param -> gradients received in this armed backward
  size_t next_ = 0;                // first bucket not sent yet
  int64_t late_param_ = -1;        // a gradient that came after its bucket was sent
  std::exception_ptr error_;       // thrown while sending from a hook; finish() rethrows it
  int64_t sent_early_ = 0, sent_during_backward_ = 0;
};

}  // namespace qtune
