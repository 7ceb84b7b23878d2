// ZeRO stage 1 for data parallelism (recipe key `dist.shard_optimizer`): AdamW's moments spread
// over the ranks instead of repeated on each.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qtune/export.h"
#include "qtune/options.h"
#include "qtune/process_group.h"

namespace qtune {

/// The trainable parameters split over the ranks of a data-parallel job, whole parameters to
/// one owner each, assigned largest first to the rank holding the fewest bytes so far (the
/// partition PyTorch's ZeroRedundancyOptimizer makes). Each rank's AdamW is built over owned()
/// only, so it keeps moments for about 1/N of the parameters. One step on every rank:
///
///     optimizer.zero_grad(); shards.zero_others_grad();
///     backward; all-reduce the gradients in full (every rank still clips by the global norm);
///     optimizer.step();            // updates this rank's own parameters
///     shards.share_parameters(g);  // every rank receives every parameter's new value
///
/// Each parameter goes through exactly the update an unsharded AdamW would give it (on its
/// owner), so the job computes what it computes without sharding, bit for bit. Checkpoints stay
/// those of an unsharded run: gather_state() assembles the whole state on rank 0 for saving, and
/// a resumed rank loads only its own parameters' moments.
///
/// The exchanges go through all-gathers of at most `chunk_bytes` per rank at a time, so they
/// need (world_size + 1) * chunk_bytes of transient memory, whatever the model.
class QTUNE_API OptimizerShards {
 public:
  /// Throws UserError naming dist.shard_optimizer when there are fewer parameters than ranks.
  OptimizerShards(std::vector<torch::Tensor> params, int64_t rank, int64_t world_size,
                  int64_t chunk_bytes = int64_t{32} << 20);

  /// The parameters this rank's optimizer steps, in the order of the list given.
  std::vector<torch::Tensor> owned() const;
  /// Whether this rank owns parameter `i` of the list given.
  bool owns(size_t i) const { return owner_[i] == rank_; }

  /// Zeros the gradients of the parameters other ranks step (this rank's optimizer's zero_grad()
  /// does not see them; every gradient is still all-reduced in full).
  void zero_others_grad();

  /// After this rank's optimizer step (every rank calls it): writes every other rank's
  /// parameters' new values into this rank's copies.
  void share_parameters(ProcessGroup& group);

  /// Every rank calls it with its own optimizer (built over owned()). On rank 0 returns an AdamW
  /// over every parameter, with `local`'s options and each owner's state (the state an unsharded
  /// run's optimizer holds, for saving); nullptr on the other ranks.
  std::unique_ptr<torch::optim::AdamW> gather_state(ProcessGroup& group,
                                                    const torch::optim::AdamW& local) const;

  /// For summary.json: parameters and bytes owned by this rank, and in all.
  Json stats() const;

 private:
  // Rank r sends `lengths[r]` bytes (known on every rank): the byte views `streams[r]` one after
  // the other. Sends this rank's stream and writes each other rank's into `streams[r]` (which
  // may be left empty where it is not wanted).
  void exchange(ProcessGroup& group, const std::vector<std::vector<torch::Tensor>>& streams,
                const std::vector<int64_t>& lengths, const std::string& what) const;

  std::vector<torch::Tensor> params_;
  std::vector<int64_t> owner_;  // param -> rank
  int64_t rank_, world_size_, chunk_bytes_;
};

/// The state `optimizer` holds for parameter `p`, or nullptr before its first step (LibTorch keys
/// it by the parameter's TensorImpl: a string in 1.x, the pointer in 2.x).
QTUNE_API const torch::optim::AdamWParamState* adamw_state(const torch::optim::AdamW& optimizer,
                                                           const torch::Tensor& p);

}  // namespace qtune
