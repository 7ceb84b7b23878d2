// ZeRO stage 1: AdamW's moments spread over the ranks (see optimizer_shards.h).
//
// Facts taken from PyTorch: ZeroRedundancyOptimizer (torch/distributed/optim/zero_redundancy_
// optimizer.py) partitions whole parameters, sorted by size, greedily to the least-loaded rank,
// steps each rank's partition locally and then sends every parameter from its owner.
#include "qtune/optimizer_shards.h"

#include <algorithm>
#include <numeric>

#include "adamw_key.h"
#include "qtune/error.h"

namespace qtune {

namespace {

int64_t bytes_of(const torch::Tensor& t) {
  return t.numel() * static_cast<int64_t>(t.element_size());
}

// A contiguous tensor's storage as a flat byte view (writes through it reach the tensor).
torch::Tensor byte_view(const torch::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "optimizer shards: tensors must be contiguous");
  return t.detach().reshape({-1}).view(torch::kUInt8);
}

// Bytes [from, from + buf.numel()) of the stream (`stream`'s byte views one after the other)
// copied into `buf` (into_buf) or from it; the part of `buf` past the stream's end is left alone.
void copy_range(const std::vector<torch::Tensor>& stream, int64_t from, const torch::Tensor& buf,
                bool into_buf) {
  const int64_t to = from + buf.numel();
  int64_t pos = 0;
  for (const auto& t : stream) {
    const int64_t lo = std::max(pos, from), hi = std::min(pos + t.numel(), to);
    if (lo < hi) {
      auto part = t.narrow(0, lo - pos, hi - lo);
      auto slot = buf.narrow(0, lo - from, hi - lo);
      if (into_buf)
        slot.copy_(part);
      else
        part.copy_(slot);
    }
    pos += t.numel();
    if (pos >= to) break;
  }
}

}  // namespace

OptimizerShards::OptimizerShards(std::vector<torch::Tensor> params, int64_t rank,
                                 int64_t world_size, int64_t chunk_bytes)
    : params_(std::move(params)), rank_(rank), world_size_(world_size), chunk_bytes_(chunk_bytes) {
  TORCH_CHECK(world_size >= 1 && rank >= 0 && rank < world_size && chunk_bytes > 0,
              "OptimizerShards: bad rank, world size or chunk size");
  const int64_t n = static_cast<int64_t>(params_.size());
  QTUNE_CHECK(n >= world_size, "dist.shard_optimizer: ", n,
              " trainable parameters cannot be spread over ", world_size,
              " ranks (each must own at least one); set dist.shard_optimizer=false");
  std::vector<size_t> order(params_.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return bytes_of(params_[a]) > bytes_of(params_[b]);
  });
  std::vector<int64_t> load(world_size, 0);
  owner_.assign(params_.size(), 0);
  for (size_t i : order) {
    const int64_t r = std::min_element(load.begin(), load.end()) - load.begin();
    owner_[i] = r;
    load[r] += std::max<int64_t>(bytes_of(params_[i]), 1);  // empty tensors still spread
  }
}

std::vector<torch::Tensor> OptimizerShards::owned() const {
  std::vector<torch::Tensor> v;
  for (size_t i = 0; i < params_.size(); ++i)
    if (owns(i)) v.push_back(params_[i]);
  return v;
}

void OptimizerShards::zero_others_grad() {
  for (size_t i = 0; i < params_.size(); ++i)
    if (!owns(i) && params_[i].grad().defined()) params_[i].mutable_grad().zero_();
}

void OptimizerShards::exchange(ProcessGroup& group,
                               const std::vector<std::vector<torch::Tensor>>& streams,
                               const std::vector<int64_t>& lengths,
                               const std::string& what) const {
  if (world_size_ == 1) return;
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  const auto options = torch::TensorOptions().dtype(torch::kUInt8).device(params_[0].device());
  for (int64_t from = 0; from < longest; from += chunk_bytes_) {
    const int64_t n = std::min(chunk_bytes_, longest - from);
    auto mine = torch::zeros({n}, options);
    copy_range(streams[rank_], from, mine, /*into_buf=*/true);
    auto all = torch::empty({n * world_size_}, options);
    group.all_gather_async(mine, all, what)->wait();
    for (int64_t r = 0; r < world_size_; ++r)
      if (r != rank_) copy_range(streams[r], from, all.narrow(0, r * n, n), /*into_buf=*/false);
  }
}

void OptimizerShards::share_parameters(ProcessGroup& group) {
  torch::NoGradGuard no_grad;
  std::vector<std::vector<torch::Tensor>> streams(world_size_);
  std::vector<int64_t> lengths(world_size_, 0);
  for (size_t i = 0; i < params_.size(); ++i) {
    streams[owner_[i]].push_back(byte_view(params_[i]));
    lengths[owner_[i]] += bytes_of(params_[i]);
  }
  exchange(group, streams, lengths, "the optimizer shards' parameter exchange");
}

std::unique_ptr<torch::optim::AdamW> OptimizerShards::gather_state(
    ProcessGroup& group, const torch::optim::AdamW& local) const {
  using torch::optim::AdamWParamState;
  torch::NoGradGuard no_grad;
  const auto& options = static_cast<const torch::optim::AdamWOptions&>(local.defaults());
  TORCH_CHECK(!options.amsgrad(), "OptimizerShards::gather_state: amsgrad is not supported");
  const bool keep = rank_ == 0;
  auto full = keep ? std::make_unique<torch::optim::AdamW>(params_, options) : nullptr;
  // Each parameter travels from its owner as [step (int64, -1 before its first update),
  // exp_avg, exp_avg_sq]; only rank 0 keeps what it receives.
  const size_t n = params_.size();
  std::vector<torch::Tensor> steps(n), avg(n), avg_sq(n);
  std::vector<std::vector<torch::Tensor>> streams(world_size_);
  std::vector<int64_t> lengths(world_size_, 0);
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params_[i];
    const int64_t r = owner_[i];
    lengths[r] += 8 + 2 * bytes_of(p);
    if (r == rank_) {
      const auto* s = adamw_state(local, p);
      steps[i] = torch::full({1}, s ? s->step() : int64_t{-1}, torch::kLong);
      avg[i] = s ? s->exp_avg() : torch::zeros_like(p);
      avg_sq[i] = s ? s->exp_avg_sq() : torch::zeros_like(p);
    } else if (keep) {
      steps[i] = torch::empty({1}, torch::kLong);
      avg[i] = torch::empty_like(p);
      avg_sq[i] = torch::empty_like(p);
    } else {
      continue;  // another rank's, not kept here
    }
    streams[r].insert(streams[r].end(),
                      {byte_view(steps[i]), byte_view(avg[i]), byte_view(avg_sq[i])});
  }
  exchange(group, streams, lengths, "the optimizer shards' state gather");
  if (!keep) return nullptr;
  auto& state = full->state();
  for (size_t i = 0; i < n; ++i) {
    const int64_t step = steps[i].item<int64_t>();
    if (step < 0) continue;
    auto s = std::make_unique<AdamWParamState>();
    s->step(step);
    s->exp_avg(avg[i]);
    s->exp_avg_sq(avg_sq[i]);
    state[detail::optimizer_key(state, params_[i])] = std::move(s);
  }
  return full;
}

const torch::optim::AdamWParamState* adamw_state(const torch::optim::AdamW& optimizer,
                                                 const torch::Tensor& p) {
  const auto& state = optimizer.state();
  auto it = state.find(detail::optimizer_key(state, p));
  return it == state.end() ? nullptr
                           : static_cast<const torch::optim::AdamWParamState*>(it->second.get());
}

Json OptimizerShards::stats() const {
  int64_t owned_params = 0, owned_bytes = 0, total = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    total += bytes_of(params_[i]);
    if (owns(i)) {
      ++owned_params;
      owned_bytes += bytes_of(params_[i]);
    }
  }
  return {{"parameters", static_cast<int64_t>(params_.size())},
          {"owned_parameters", owned_params},
          {"parameter_bytes", total},
          {"owned_parameter_bytes", owned_bytes}};
}

}  // namespace qtune
