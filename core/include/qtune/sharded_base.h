// A quantized base sharded over the ranks of a process group (recipe key dist.shard_base), the way
// FSDP shards fsdp_qlora's 4-bit base: every rank keeps 1/N of the bytes of each decoder layer's
// quantized projections and gathers a projection's full weight when it is used — in forward, and
// again in backward (the input gradient needs W) — dropping the previous one then. While one
// projection computes, the one expected next is already being gathered (an all-gather in flight
// in the backend's threads), so a rank holds its shards plus two projections: the unit gathered
// is one weight, not a whole decoder layer as fsdp_qlora wraps it (a seventh of a Llama layer's
// bytes for the largest MLP projection), with the same one all-gather per weight.
//
// It works for every backend without plugin changes: what is sharded is the bytes of the tensors
// QuantizedWeight::state() returns (each weight's held tensors laid end to end, split evenly over
// the ranks, the last share padded; the small ones state() derives on demand are kept whole),
// and a gathered weight is rebuilt from those bytes with the backend's own QuantBackend::load —
// so it is byte for byte the weight an unsharded run holds.
// A backend whose load is not cheap (QuantBackend::load_is_cheap) is refused.
//
// Which weight comes next is learned, not assumed: at each switch, the previous weight, the
// current one and what it is used for (forward, input gradient, dequantize; and whether a
// checkpointed layer is being recomputed, core's in_recompute()) remember what followed, which
// covers forward (q, k, v, ... of layer 0, then 1), backward (down, up, ... of the last layer
// first), activation checkpointing (a layer's first forward and its recompute run the same
// weights in the same grad mode, followed by different ones) and evaluation alike. Every rank
// runs the same weights in the same order, so every rank starts the same collectives in the same
// order; a wrong guess costs one gather that is waited for and dropped.
//
// The output head (when quantized) and the token embedding (a frozen dense table, only looked up)
// are sharded the same way: every forward pass looks the embedding up once and runs the head once
// (its input gradient and the chunked loss's recomputes follow while the head is still the
// gathered weight, so a rank's count of targets never changes the gathers). Norms stay whole.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "qtune/export.h"
#include "qtune/options.h"
#include "qtune/quantized_weight.h"
#include "qtune/tensor_state.h"

namespace qtune {

class ProcessGroup;

class QTUNE_API BaseShards {
 public:
  /// Throws UserError (naming dist.shard_base) when `backend` says its load is not cheap.
  BaseShards(std::shared_ptr<ProcessGroup> group, std::shared_ptr<QuantBackend> backend);
  ~BaseShards();

  /// This rank's shard of `full`, a projection of decoder layer `layer` (-1: the head) called
  /// `name` (for messages). The caller drops `full` afterwards: only the shard is kept.
  std::shared_ptr<QuantizedWeight> shard(const QuantizedWeight& full, int64_t layer,
                                         const std::string& name);
  /// The same from a stored state (a qtune-quantize directory): only this rank's byte ranges of
  /// the state's tensors are read, so a memory-mapped file is touched only there (every stored
  /// tensor is sharded). The state is checked by the backend when its layer is first gathered
  /// (errors name `name`).
  std::shared_ptr<QuantizedWeight> shard(const TensorState& state, int64_t layer,
                                         const std::string& name);

  /// A frozen dense table (the token embedding of a quantized base) kept in shards like a
  /// weight: `shard` is this rank's bytes (uint8), and `gather` returns the whole table (a view
  /// of its gathered bytes, held until the next weight is gathered). `gather` is a collective:
  /// every rank calls it at the same point of the same pass, as a projection's use.
  struct Table {
    torch::Tensor shard;
    std::function<torch::Tensor()> gather;
  };
  Table shard_table(const torch::Tensor& table, const std::string& name);

  /// Drops every gathered layer, waiting for a gather in flight: only the shards stay held.
  /// Called by every rank at the same points (the trainer: after each step's backward and after
  /// each evaluation).
  void release_all();

  int64_t world_size() const;
  /// Bytes of the shards this rank holds, and of the whole quantized weights (what they hold
  /// unsharded, QuantizedWeight::nbytes; for a stored state, its tensors' bytes until the
  /// weight is first gathered).
  int64_t shard_bytes() const;
  int64_t full_bytes() const;
  /// Gathered bytes held now, their peak since construction (at most two weights': the one in
  /// use and the one gathered ahead), and the largest decoder layer's and weight's (the
  /// embedding and head included) gathered bytes.
  int64_t gathered_bytes() const;
  int64_t peak_gathered_bytes() const;
  int64_t max_layer_bytes() const;
  int64_t max_weight_bytes() const;
  /// Weight gathers started, and how many of them were started early and then used.
  int64_t gathers() const;
  int64_t prefetch_hits() const;
  /// All of the above as JSON (for summary.json).
  Json stats() const;

  struct Impl;  // process group, shards, the gathered layers (sharded_base.cpp)

 private:
  std::shared_ptr<Impl> impl_;
};

/// The decoder layer of a module or tensor path ("model.layers.3.mlp.up_proj.weight" -> 3), or
/// -1 when it is not inside one.
QTUNE_API int64_t decoder_layer_of(const std::string& path);

}  // namespace qtune
