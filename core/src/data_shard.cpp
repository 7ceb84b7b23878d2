// Per-rank shares of the training and evaluation batches (see data_shard.h).
#include "qtune/data_shard.h"

#include "qtune/error.h"

namespace qtune {

namespace {

Batch rows(const Batch& b, int64_t start, int64_t count) {
  Batch out;
  out.tokens = b.tokens.narrow(0, start, count).contiguous();
  out.targets = b.targets.narrow(0, start, count).contiguous();
  if (b.positions.defined()) out.positions = b.positions.narrow(0, start, count).contiguous();
  if (b.segments.defined()) out.segments = b.segments.narrow(0, start, count).contiguous();
  out.num_targets = out.targets.ne(kIgnoreIndex).sum().item<int64_t>();
  return out;
}

int64_t checked_global(const TokenDataset& d, int64_t batch_size, int64_t rank, int64_t world) {
  QTUNE_CHECK(world >= 1 && rank >= 0 && rank < world, "data: rank ", rank,
              " is outside a world of ", world);
  QTUNE_CHECK(batch_size >= 1, "train.batch_size must be >= 1, got ", batch_size);
  QTUNE_CHECK(world == 1 || d.size() >= world * batch_size, "'", d.stats().source, "' gives ",
              d.size(), " examples of ", d.seq_len(),
              " tokens, fewer than one global batch of ", world, " ranks x train.batch_size ",
              batch_size, "; lower the batch size or data.seq_len, or add data");
  return world * batch_size;
}

}  // namespace

ShardedLoader::ShardedLoader(std::shared_ptr<const TokenDataset> dataset, int64_t batch_size,
                             int64_t rank, int64_t world, uint64_t seed)
    : global_(dataset, checked_global(*dataset, batch_size, rank, world), seed, /*shuffle=*/true,
              /*drop_last=*/true),
      batch_size_(batch_size),
      rank_(rank),
      world_(world) {}

Batch ShardedLoader::next() {
  Batch b = global_.next();
  if (world_ == 1) return b;
  return rows(b, rank_ * batch_size_, batch_size_);
}

void for_each_eval_share(const TokenDataset& dataset, int64_t batch_size, int64_t rank,
                         int64_t world, int64_t max_batches,
                         const std::function<void(const Batch&)>& fn) {
  QTUNE_CHECK(world >= 1 && rank >= 0 && rank < world && batch_size >= 1, "eval: rank ", rank,
              " of ", world, " with batch size ", batch_size);
  const int64_t global = world * batch_size;
  if (world == 1) {
    for_each_eval_batch(dataset, global, max_batches, fn);
    return;
  }
  for_each_eval_batch(dataset, global, max_batches, [&](const Batch& b) {
    const int64_t n = b.tokens.size(0), base = n / world, extra = n % world;
    const int64_t count = base + (rank < extra ? 1 : 0);
    const int64_t start = rank * base + std::min(rank, extra);
    if (count > 0) fn(rows(b, start, count));
  });
}

}  // namespace qtune
