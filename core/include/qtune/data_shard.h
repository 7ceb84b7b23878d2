// Data parallelism's view of the data: each rank's disjoint, deterministic share of every global
// batch, and of the evaluation batches. The global batch is what one process with
// world_size x batch_size examples would read, so N ranks see exactly the examples of one.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "qtune/data.h"
#include "qtune/export.h"

namespace qtune {

/// A DataLoader over global batches of world x batch_size examples from which this rank takes
/// rows [rank * batch_size, (rank + 1) * batch_size). Its position (state()) is the global
/// loader's, identical on every rank, so a checkpoint taken with N ranks resumes on M ranks when
/// M x batch_size stays the same global batch. With world 1 it is exactly DataLoader.
class QTUNE_API ShardedLoader {
 public:
  /// Throws UserError when the dataset cannot fill one global batch (naming the world size).
  ShardedLoader(std::shared_ptr<const TokenDataset> dataset, int64_t batch_size, int64_t rank,
                int64_t world, uint64_t seed);

  /// This rank's share ([batch_size, T]) of the global batch at the current position; advances.
  Batch next();
  LoaderState state() const { return global_.state(); }
  /// See DataLoader::restore; the state's batch_size is the global batch.
  void restore(const LoaderState& s) { global_.restore(s); }
  uint64_t epoch() const { return global_.epoch(); }
  int64_t batches_per_epoch() const { return global_.batches_per_epoch(); }

 private:
  DataLoader global_;
  int64_t batch_size_, rank_, world_;
};

/// Evaluation split over ranks: walks the batches of for_each_eval_batch(dataset,
/// world x batch_size, max_batches) (global batches in index order, the last may be short) and
/// calls fn with this rank's rows of each: rows are dealt in contiguous runs, the first
/// (rows % world) ranks taking one more, and a rank with no rows of a batch is skipped. Summing
/// every rank's loss x targets gives what one process evaluating the same examples gets.
QTUNE_API void for_each_eval_share(const TokenDataset& dataset, int64_t batch_size, int64_t rank,
                                   int64_t world, int64_t max_batches,
                                   const std::function<void(const Batch&)>& fn);

}  // namespace qtune
