// Sharded quantized base (see sharded_base.h). Facts from PyTorch FSDP (flat parameters split
// evenly over ranks with the last share padded; all-gather before forward and again before
// backward, prefetching the next module) and from bitsandbytes' quant_storage (a 4-bit state
// travels as plain bytes): the byte layout and rebuild below are our own.
#include "qtune/sharded_base.h"

#include <spdlog/spdlog.h>

#include <cctype>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "qtune/error.h"
#include "qtune/process_group.h"
#include "qtune/recompute.h"

namespace qtune {

namespace {

constexpr int64_t kAlign = 64;  // every tensor of a gathered weight starts on a 64-byte boundary

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

}  // namespace

class ShardedWeight;

struct BaseShards::Impl {
  // Declared first, destroyed last: gathers in flight are waited for before the group goes.
  std::shared_ptr<ProcessGroup> group;
  std::shared_ptr<QuantBackend> backend;
  int64_t rank = 0, world = 1;

  // One tensor of a weight's state inside the weight's flat bytes. (Declared here, not in the
  // anonymous namespace: Weight, a member of an exported class's Impl, holds it.)
  struct Piece {
    std::string key;
    torch::ScalarType dtype;
    std::vector<int64_t> shape;
    int64_t offset = 0, nbytes = 0;
  };
  struct Weight {
    std::string name;
    int64_t layer = 0;
    Json meta;
    std::vector<Piece> pieces;
    // Tensors state() derives on demand (a serialised record, say): small, kept whole.
    std::map<std::string, torch::Tensor> derived;
    int64_t shard_len = 0;          // bytes per rank; world * shard_len >= the pieces' end
    int64_t full_bytes = 0;         // what the unsharded weight holds
    bool full_bytes_known = false;  // a stored state's: learnt when first rebuilt
    torch::Tensor shard;            // uint8 [shard_len], this rank's bytes
    bool table = false;             // a dense table (shard_table), not a quantized weight
    std::shared_ptr<QuantizedWeight> rebuilt;  // while it is the gathered weight
    torch::Tensor rebuilt_table;               // the same for a table
  };
  std::vector<Weight> weights;
  std::map<int64_t, std::vector<int64_t>> layers;  // layer -> weight ids, in build order

  // A weight being gathered or gathered: its flat buffer and its all-gather.
  struct Gathered {
    int64_t id = -1;
    torch::Tensor flat;
    std::unique_ptr<PendingCollective> pending;
    int64_t bytes = 0;
  };
  std::unique_ptr<Gathered> current, ahead;
  // What followed a weight: keyed by the weight before it, the weight, and the use it was
  // switched to for (Use, plus kUses inside a checkpointed layer's recompute: the recompute calls
  // the first forward's weights in the same order, and different ones follow).
  using Key = std::tuple<int64_t, int64_t, int>;
  std::map<Key, int64_t> successor;
  int64_t prev = -1, last = -1;
  int last_use = 0;

  int64_t gathered = 0, peak = 0, gathers = 0, hits = 0;
  std::recursive_mutex mu;

  std::unique_ptr<Gathered> start(int64_t id) {
    const Weight& w = weights[id];
    auto g = std::make_unique<Gathered>();
    g->id = id;
    g->flat = torch::empty({world * w.shard_len}, w.shard.options());
    g->pending = group->all_gather_async(
        w.shard, g->flat, "the gather of " + w.name + " (layer " + std::to_string(w.layer) + ")");
    g->bytes = world * w.shard_len;
    gathered += g->bytes;
    peak = std::max(peak, gathered);
    ++gathers;
    return g;
  }

  void drop(std::unique_ptr<Gathered>& g) {
    if (!g) return;
    g->pending->wait();  // started on every rank: every rank finishes it
    if (current == g) {
      weights[g->id].rebuilt.reset();
      weights[g->id].rebuilt_table = torch::Tensor();
    }
    gathered -= g->bytes;
    g.reset();
  }

  // Makes weight `id` the gathered one, rebuilt by the backend from the gathered bytes, and
  // starts gathering the weight expected next.
  void switch_to(int64_t id, int use) {
    if (last >= 0) successor[{prev, last, last_use}] = id;
    prev = last;
    last = id;
    last_use = use;
    drop(current);
    if (ahead && ahead->id == id) {
      current = std::move(ahead);
      ++hits;
    } else {
      drop(ahead);
      current = start(id);
    }
    current->pending->wait();
    Weight& w = weights[id];
    if (w.table)
      w.rebuilt_table = views(w, current->flat).at("table");
    else
      w.rebuilt = rebuild(w, current->flat);
    if (!w.full_bytes_known) {
      w.full_bytes = w.rebuilt->nbytes();
      w.full_bytes_known = true;
    }
    auto next = successor.find({prev, last, last_use});
    if (next != successor.end() && next->second != id) ahead = start(next->second);
  }

  // The held tensors of `w` as views of its gathered bytes, beside the ones kept whole.
  static std::map<std::string, torch::Tensor> views(const Weight& w, const torch::Tensor& flat) {
    std::map<std::string, torch::Tensor> out = w.derived;
    auto* base = static_cast<uint8_t*>(flat.data_ptr());
    for (const Piece& p : w.pieces) {
      auto options = torch::TensorOptions().dtype(p.dtype).device(flat.device());
      if (p.nbytes == 0) {
        out[p.key] = torch::empty(p.shape, options);
        continue;
      }
      torch::Tensor keep = flat;  // the views keep the gathered buffer alive
      out[p.key] = torch::from_blob(
          base + p.offset, p.shape, [keep](void*) mutable { keep.reset(); }, options);
    }
    return out;
  }

  std::shared_ptr<QuantizedWeight> rebuild(const Weight& w, const torch::Tensor& flat) const {
    TensorState st;
    st.meta = w.meta;
    st.tensors = views(w, flat);
    try {
      std::shared_ptr<QuantizedWeight> q = backend->load(st);
      QTUNE_INTERNAL_ASSERT(q != nullptr, "plugin '", backend->name(), "' rebuilt no weight");
      return q;
    } catch (const UserError& e) {
      throw UserError(detail::concat("dist.shard_base: ", w.name, ": ", e.what()));
    }
  }

  enum Use { kForward, kGradInput, kDequantize, kUses };

  std::shared_ptr<QuantizedWeight> acquire(int64_t id, Use use) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    Weight& w = weights[id];
    if (!current || current->id != id) switch_to(id, use + (in_recompute() ? kUses : 0));
    return w.rebuilt;
  }

  torch::Tensor acquire_table(int64_t id) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    if (!current || current->id != id) switch_to(id, kForward);
    return weights[id].rebuilt_table;
  }

  void release_all() {
    std::lock_guard<std::recursive_mutex> lock(mu);
    drop(ahead);
    drop(current);
    prev = last = -1;
  }

  // Lays the held `tensors` end to end and keeps this rank's share of their bytes; `derived`
  // ones are kept whole.
  int64_t add(const std::map<std::string, torch::Tensor>& tensors,
              std::map<std::string, torch::Tensor> derived, const Json& meta, int64_t layer,
              const std::string& name, int64_t full_bytes) {
    Weight w;
    w.derived = std::move(derived);
    for (auto& [_, t] : w.derived) t = t.clone();
    w.name = name;
    w.layer = layer;
    w.meta = meta;
    w.full_bytes = std::max<int64_t>(full_bytes, 0);
    w.full_bytes_known = full_bytes >= 0;
    int64_t end = 0;
    torch::Device device = torch::kCPU;
    for (const auto& [key, t] : tensors) {
      Piece p;
      p.key = key;
      p.dtype = t.scalar_type();
      p.shape = t.sizes().vec();
      p.offset = round_up(end, kAlign);
      p.nbytes = t.numel() * static_cast<int64_t>(t.element_size());
      end = p.offset + p.nbytes;
      w.pieces.push_back(std::move(p));
      device = t.device();
    }
    w.shard_len = round_up((end + world - 1) / world, kAlign);
    auto shard = torch::zeros({w.shard_len}, torch::kUInt8);
    const int64_t lo = rank * w.shard_len, hi = lo + w.shard_len;
    auto* dst = static_cast<uint8_t*>(shard.data_ptr());
    for (const Piece& p : w.pieces) {
      const int64_t a = std::max(lo, p.offset), b = std::min(hi, p.offset + p.nbytes);
      if (a >= b) continue;
      // Only these bytes are read: a view of a mapped file is touched here and nowhere else.
      torch::Tensor t = tensors.at(p.key);
      if (!t.device().is_cpu()) t = t.to(torch::kCPU);
      t = t.contiguous();
      std::memcpy(dst + (a - lo), static_cast<const uint8_t*>(t.data_ptr()) + (a - p.offset),
                  static_cast<size_t>(b - a));
    }
    w.shard = device.is_cpu() ? shard : shard.to(device);
    const int64_t id = static_cast<int64_t>(weights.size());
    weights.push_back(std::move(w));
    layers[layer].push_back(id);
    return id;
  }
};

// A projection whose base lives in shards: every use goes through its gathered, rebuilt weight.
// Its only held tensor is this rank's shard.
class ShardedWeight final : public QuantizedWeight {
 public:
  ShardedWeight(std::shared_ptr<BaseShards::Impl> owner, int64_t id, int64_t out, int64_t in)
      : owner_(std::move(owner)), id_(id), out_(out), in_(in) {}

  std::string backend() const override { return owner_->backend->name(); }
  int64_t out_features() const override { return out_; }
  int64_t in_features() const override { return in_; }
  torch::Tensor dequantize(torch::ScalarType dtype, torch::Device device) const override {
    return owner_->acquire(id_, BaseShards::Impl::kDequantize)->dequantize(dtype, device);
  }
  torch::Tensor dequantize_rows(int64_t begin, int64_t end, torch::ScalarType dtype,
                                torch::Device device) const override {
    return owner_->acquire(id_, BaseShards::Impl::kDequantize)
        ->dequantize_rows(begin, end, dtype, device);
  }
  torch::Tensor linear(const torch::Tensor& x) const override {
    return owner_->acquire(id_, BaseShards::Impl::kForward)->linear(x);
  }
  torch::Tensor linear_grad_input(const torch::Tensor& g) const override {
    return owner_->acquire(id_, BaseShards::Impl::kGradInput)->linear_grad_input(g);
  }
  /// The shard and what it is a shard of; not a state QuantBackend::load takes (gather first).
  TensorState state() const override {
    const auto& w = owner_->weights[id_];
    TensorState st;
    st.tensors["shard"] = w.shard;
    st.meta = {{"backend", backend()},
               {"shape", {out_, in_}},
               {"options", w.meta.value("options", Json::object())},
               {"sharded", {{"rank", owner_->rank}, {"world_size", owner_->world}}}};
    return st;
  }
  void to(torch::Device device) override {
    auto& w = owner_->weights[id_];
    w.shard = w.shard.to(device);
  }
  torch::Device device() const override { return owner_->weights[id_].shard.device(); }

 private:
  std::shared_ptr<BaseShards::Impl> owner_;
  int64_t id_, out_, in_;
};

BaseShards::BaseShards(std::shared_ptr<ProcessGroup> group, std::shared_ptr<QuantBackend> backend)
    : impl_(std::make_shared<Impl>()) {
  QTUNE_CHECK(group != nullptr && backend != nullptr, "BaseShards needs a group and a backend");
  QTUNE_CHECK(backend->load_is_cheap(), "dist.shard_base: quant backend '", backend->name(),
              "' says rebuilding a weight from its state (QuantBackend::load) is not cheap, so "
              "its base cannot be sharded (a weight is rebuilt every time it is gathered); "
              "set dist.shard_base=false");
  impl_->group = std::move(group);
  impl_->backend = std::move(backend);
  impl_->rank = impl_->group->rank();
  impl_->world = impl_->group->world_size();
}

BaseShards::~BaseShards() = default;

std::shared_ptr<QuantizedWeight> BaseShards::shard(const QuantizedWeight& full, int64_t layer,
                                                   const std::string& name) {
  QTUNE_INTERNAL_ASSERT(full.backend() == impl_->backend->name(), "a '", full.backend(),
                        "' weight given to shards of '", impl_->backend->name(), "'");
  const TensorState st = full.state();
  const auto held = held_tensors(full);
  std::map<std::string, torch::Tensor> derived;
  for (const auto& [key, t] : st.tensors)
    if (!held.count(key)) derived[key] = t;
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  const int64_t id = impl_->add(held, std::move(derived), st.meta, layer, name, full.nbytes());
  return std::make_shared<ShardedWeight>(impl_, id, full.out_features(), full.in_features());
}

std::shared_ptr<QuantizedWeight> BaseShards::shard(const TensorState& state, int64_t layer,
                                                   const std::string& name) {
  const Json shape = state.meta.value("shape", Json());
  QTUNE_CHECK(shape.is_array() && shape.size() == 2 && shape[0].is_number_integer() &&
                  shape[1].is_number_integer(),
              name, ": the quantized state's metadata has no \"shape\": [out, in]");
  // What the weight holds unsharded is known once it is first rebuilt; until then its tensors'
  // bytes stand in.
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  const int64_t id = impl_->add(state.tensors, {}, state.meta, layer, name, -1);
  auto& w = impl_->weights[id];
  for (const auto& [_, t] : state.tensors) w.full_bytes += t.numel() * t.element_size();
  return std::make_shared<ShardedWeight>(impl_, id, shape[0].get<int64_t>(),
                                         shape[1].get<int64_t>());
}

BaseShards::Table BaseShards::shard_table(const torch::Tensor& table, const std::string& name) {
  QTUNE_INTERNAL_ASSERT(!table.requires_grad(), name, ": a trainable table cannot be sharded");
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  const int64_t id = impl_->add({{"table", table}}, {}, Json::object(), -1, name,
                                table.numel() * static_cast<int64_t>(table.element_size()));
  auto& w = impl_->weights[id];
  w.table = true;
  std::shared_ptr<Impl> owner = impl_;
  return {w.shard, [owner, id] { return owner->acquire_table(id); }};
}

void BaseShards::release_all() { impl_->release_all(); }

int64_t BaseShards::world_size() const { return impl_->world; }

int64_t BaseShards::shard_bytes() const {
  int64_t n = 0;
  for (const auto& w : impl_->weights) n += w.shard_len;
  return n;
}

int64_t BaseShards::full_bytes() const {
  int64_t n = 0;
  for (const auto& w : impl_->weights) n += w.full_bytes;
  return n;
}

int64_t BaseShards::gathered_bytes() const { return impl_->gathered; }
int64_t BaseShards::peak_gathered_bytes() const { return impl_->peak; }

int64_t BaseShards::max_layer_bytes() const {
  int64_t best = 0;
  for (const auto& [layer, ids] : impl_->layers) {
    if (layer < 0) continue;  // the embedding and the head are not a decoder layer
    int64_t n = 0;
    for (int64_t id : ids) n += impl_->world * impl_->weights[id].shard_len;
    best = std::max(best, n);
  }
  return best;
}

int64_t BaseShards::max_weight_bytes() const {
  int64_t best = 0;
  for (const auto& w : impl_->weights) best = std::max(best, impl_->world * w.shard_len);
  return best;
}

int64_t BaseShards::gathers() const { return impl_->gathers; }
int64_t BaseShards::prefetch_hits() const { return impl_->hits; }

Json BaseShards::stats() const {
  return {{"world_size", world_size()},
          {"shard_bytes", shard_bytes()},
          {"full_bytes", full_bytes()},
          {"max_layer_bytes", max_layer_bytes()},
          {"max_weight_bytes", max_weight_bytes()},
          {"peak_gathered_bytes", peak_gathered_bytes()},
          {"gathers", gathers()},
          {"prefetch_hits", prefetch_hits()},
          {"gather_seconds", impl_->group->gather_seconds()},
          {"gather_bytes", impl_->group->gather_bytes()}};
}

int64_t decoder_layer_of(const std::string& path) {
  static const std::string prefix = "model.layers.";
  if (path.rfind(prefix, 0) != 0) return -1;
  size_t i = prefix.size();
  int64_t n = 0;
  bool digits = false;
  while (i < path.size() && std::isdigit(static_cast<unsigned char>(path[i]))) {
    n = n * 10 + (path[i++] - '0');
    digits = true;
    if (n > (int64_t{1} << 40)) return -1;
  }
  return digits && i < path.size() && path[i] == '.' ? n : -1;
}

}  // namespace qtune
