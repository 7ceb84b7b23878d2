// Data-parallel process groups on PyTorch's c10d: where this process sits in the job (from
// torchrun's or SLURM's environment), joining the group (rank 0 hosts the c10d TCPStore; Gloo on
// CPU, NCCL on GPU when LibTorch has CUDA), the collectives the trainer needs (sums, blocking or
// started asynchronously; gradient buckets build on them in gradient_buckets.h), a start-up
// agreement check between ranks, and naming a lost rank when a collective fails.
//
// No c10d type appears here: the c10d headers (and their LibTorch 1.13 / 2.x differences) stay in
// process_group.cpp.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "qtune/export.h"
#include "qtune/options.h"

namespace qtune {

/// The recipe's `dist.*` keys.
struct DistConfig {
  /// "gloo", "nccl" or "auto" (nccl for a cuda device when LibTorch has it, gloo otherwise).
  std::string backend = "auto";
  /// Seconds a rank waits for the others: joining, every collective, the start-up checks. A rank
  /// that dies is noticed sooner (its connections close); one that hangs, after this long.
  double timeout_s = 600;
  /// Rank 0's host and port, used when the launcher does not set MASTER_ADDR / MASTER_PORT
  /// (SLURM's srun does not).
  std::string master_addr;
  int64_t master_port = 29500;
  /// Size of one gradient all-reduce bucket in MiB (> 0).
  double bucket_mb = 25;
};

/// Reads and checks the `dist` mapping of a complete recipe (UserError naming dist.<key>).
QTUNE_API DistConfig dist_config_from_recipe(const Json& recipe);

/// Where this process sits in the job.
struct WorldInfo {
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t local_rank = 0;        ///< rank among the processes of this machine
  int64_t local_world_size = 1;  ///< processes of this job on this machine
  std::string master_addr;       ///< host of rank 0's TCPStore (empty for a world of 1)
  int64_t master_port = 0;
  /// "single" (no launcher), "torchrun" (RANK/WORLD_SIZE/... variables) or "slurm".
  std::string launcher = "single";
  /// torchrun's agent already hosts the store (TORCHELASTIC_USE_AGENT_STORE=True): every rank is
  /// a client, keys live under store_prefix.
  bool agent_store = false;
  std::string store_prefix;
  /// Where each value came from (for error messages), e.g. "MASTER_PORT" or "dist.master_port".
  std::string master_addr_from, master_port_from;
};

/// An environment to read from: name -> value (tests pass their own; see current_environment).
using Environment = std::map<std::string, std::string>;
/// This process's environment.
QTUNE_API Environment current_environment();

/// The world described by `env`: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
/// LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) when RANK is set, else SLURM's (SLURM_PROCID,
/// SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE; the master from
/// MASTER_ADDR/MASTER_PORT or dist.master_addr/dist.master_port) when SLURM_NTASKS > 1, else a
/// world of one. Throws UserError naming the variable for a malformed or inconsistent value.
QTUNE_API WorldInfo world_from_environment(const Environment& env, const DistConfig& config);

class ProcessGroupImpl;  // the c10d objects (process_group.cpp)
class ProcessGroup;

/// A collective started by ProcessGroup::all_gather_async or all_reduce_sum_async, running in
/// the backend's threads while this one computes. wait() blocks until it is done and throws the
/// same UserError as the blocking calls on failure. Its tensors must be left alone until then.
/// Destroying one that was never waited for waits for it first (its buffers must outlive it),
/// swallowing its error: that is the path of a run already failing for another reason.
class QTUNE_API PendingCollective {
 public:
  ~PendingCollective();
  PendingCollective(const PendingCollective&) = delete;
  PendingCollective& operator=(const PendingCollective&) = delete;
  void wait();
  bool waited() const { return waited_; }

 private:
  friend class ProcessGroup;
  struct Work;
  PendingCollective(ProcessGroup* group, std::string what, int64_t bytes, bool gather,
                    std::unique_ptr<Work> work);
  ProcessGroup* group_;
  std::string what_;
  int64_t bytes_;
  bool gather_;
  std::unique_ptr<Work> work_;  // null for a world of one (nothing in flight)
  bool waited_ = false;
};

/// A joined process group, or the trivial group of a single process (every collective is then a
/// no-op and nothing from c10d is created). Collectives must be called by every rank in the same
/// order. A failure of a collective (a peer died, or nothing came within dist.timeout_s) throws
/// UserError "dist: lost rank N (...) during <what>" naming the rank(s) that stopped answering.
class QTUNE_API ProcessGroup {
 public:
  /// Joins the group: rank 0 starts the TCPStore on master_port (others connect to
  /// master_addr:master_port, retrying until dist.timeout_s), the ranks check that they agree on
  /// the world size and that no rank is claimed twice, then the collective backend connects.
  /// `device` is the training device ("cpu", "cuda:1"); it picks the backend for "auto".
  /// One-line UserErrors: port in use, master unreachable or unknown, mismatched WORLD_SIZE,
  /// duplicate RANK, nccl without CUDA.
  static std::shared_ptr<ProcessGroup> join(const WorldInfo& world, const DistConfig& config,
                                            const std::string& device = "cpu");
  /// The group of one process.
  static std::shared_ptr<ProcessGroup> single();
  ~ProcessGroup();

  int64_t rank() const { return world_.rank; }
  int64_t world_size() const { return world_.world_size; }
  const WorldInfo& world() const { return world_; }
  /// Whether this rank writes outputs (rank 0).
  bool is_main() const { return world_.rank == 0; }
  /// "gloo", "nccl" or "none" (world of 1).
  const std::string& backend() const { return backend_; }

  /// Sums `t` (contiguous; float, double or int64) over all ranks in place, as one collective.
  /// `what` names the operation in error messages.
  void all_reduce_sum(torch::Tensor& t, const std::string& what);
  /// Starts summing `t` (contiguous; float, double or int64) over all ranks in place and returns
  /// at once; the sum is in `t` after wait(). Collectives, blocking or not, must be started in
  /// the same order on every rank.
  std::unique_ptr<PendingCollective> all_reduce_sum_async(const torch::Tensor& t,
                                                          const std::string& what);
  /// Starts gathering every rank's `mine` (contiguous, 1-D, the same length n and dtype on every
  /// rank) into `all` (contiguous, 1-D, world_size * n): rank r's part lands at [r*n, (r+1)*n).
  std::unique_ptr<PendingCollective> all_gather_async(const torch::Tensor& mine,
                                                      const torch::Tensor& all,
                                                      const std::string& what);
  /// Whether `flag` is true on any rank (one small all-reduce; `flag` itself for a world of 1).
  bool any(bool flag, const std::string& what);
  /// Blocks until every rank has called it.
  void barrier(const std::string& what);

  /// Start-up agreement: every rank passes its description of `what` (a JSON object, e.g. the
  /// recipe and fingerprints of the base and the adapters' initial state); if any rank's differs
  /// from rank 0's, every rank throws the same UserError naming the rank(s) and the first
  /// differing keys with both values. Goes through the store, not the collective backend.
  void check_agreement(const std::string& what, const Json& mine);

  /// Seconds blocked in all-reduces (all_reduce_sum, or waiting for an all_reduce_sum_async)
  /// since the group was joined, and bytes they reduced (for measurements); the same for
  /// all-gathers. Time a collective spends in flight while this thread computes is not counted.
  double reduce_seconds() const { return reduce_seconds_; }
  int64_t reduce_bytes() const { return reduce_bytes_; }
  double gather_seconds() const { return gather_seconds_; }
  int64_t gather_bytes() const { return gather_bytes_; }

  /// Leaves the group cleanly after the last collective: a barrier, then rank 0 (which hosts the
  /// store) waits until every rank is done with the store. Destroying the group without finish()
  /// is the error path: no waiting for the others (they notice this rank is gone), except that
  /// the store's host lingers a few seconds so the others can still name what went wrong.
  void finish();
  /// Publishes this rank's failure message for the others' diagnosis, without waiting. Safe to
  /// call when the store is gone.
  void announce_failure(const std::string& message) noexcept;

 private:
  friend class PendingCollective;
  ProcessGroup() = default;
  [[noreturn]] void fail(const std::string& what, const std::exception& e);

  WorldInfo world_;
  std::string backend_ = "none";
  std::unique_ptr<ProcessGroupImpl> impl_;
  double reduce_seconds_ = 0, gather_seconds_ = 0;
  int64_t reduce_bytes_ = 0, gather_bytes_ = 0;
};

/// 64-bit FNV-1a over the bytes of `tensors` in order (each made contiguous on the CPU), as 16
/// hex digits: a fingerprint of a model's trainable state for agreement checks.
QTUNE_API std::string tensor_fingerprint(const std::vector<torch::Tensor>& tensors);

}  // namespace qtune
