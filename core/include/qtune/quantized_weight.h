// The first of the two interfaces the trainer knows: a frozen weight matrix W[out, in] stored in
// few bits (QuantizedWeight), and the plugin-side factory that makes one (QuantBackend).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "qtune/export.h"
#include "qtune/options.h"
#include "qtune/tensor_state.h"

namespace qtune {

/// One frozen, quantized matrix W[out, in]. Immutable after construction except for `to()`.
class QTUNE_API QuantizedWeight {
 public:
  virtual ~QuantizedWeight();

  /// Name of the backend that made this weight ("nf4", "hqq", ...).
  virtual std::string backend() const = 0;
  /// Logical shape {out_features, in_features}.
  virtual int64_t out_features() const = 0;
  virtual int64_t in_features() const = 0;

  /// The reference semantics: the full matrix [out, in] in `dtype` on `device`. Allocates.
  virtual torch::Tensor dequantize(torch::ScalarType dtype, torch::Device device) const = 0;
  /// Rows [begin, end) of W, shape [end - begin, in]. The default slices dequantize(); backends
  /// should override it so the tiled linear below never materialises all of W.
  virtual torch::Tensor dequantize_rows(int64_t begin, int64_t end, torch::ScalarType dtype,
                                        torch::Device device) const;

  /// y = x @ W^T for x[..., in] -> y[..., out], in x's dtype. The default dequantizes W in
  /// tiles of tile_rows() output rows (dequantize_rows) and never holds more than one tile in
  /// full precision; a backend may override it with a fused kernel.
  virtual torch::Tensor linear(const torch::Tensor& x) const;
  /// grad_x = g @ W for g[..., out] -> [..., in], in g's dtype; same tiling as `linear`.
  virtual torch::Tensor linear_grad_input(const torch::Tensor& g) const;

  /// Named tensors (sharing storage with this weight) and JSON metadata; `QuantBackend::load`
  /// of the result rebuilds an identical weight. meta always holds "backend", "shape" and
  /// "options".
  virtual TensorState state() const = 0;
  /// Bytes really held: the default sums held_tensors() (packed codes, scales, code tables). A
  /// backend adds what it holds outside tensors and may leave out tables shared process-wide.
  virtual int64_t nbytes() const;
  /// Moves every tensor to `device` in place (handles from state() see the move).
  virtual void to(torch::Device device) = 0;
  virtual torch::Device device() const = 0;

 protected:
  /// Rows of W dequantized per tile by the default linear/linear_grad_input.
  virtual int64_t tile_rows() const;
};

/// The tensors a weight really holds: those state() hands out as the same storage on every
/// call. Tensors state() builds on demand (a serialised JSON record, say) are derived, not held:
/// they are neither registered as module buffers nor counted as model memory.
QTUNE_API std::map<std::string, torch::Tensor> held_tensors(const QuantizedWeight& w);

/// A quantization plugin's factory. Stateless; safe to call from several threads.
class QTUNE_API QuantBackend {
 public:
  virtual ~QuantBackend();

  virtual std::string name() const = 0;
  /// Every option with its default. Users' options are checked against it by resolve_options().
  virtual std::vector<OptionSpec> option_schema() const = 0;
  /// Resolves `user` options (defaults filled in, types and the schema's min/max/choices checked
  /// by resolve_options) and checks what the schema cannot say (a power of two, a combination of
  /// options). Throws UserError naming `<context>.<key>` ("quant.options.block_size must be ...").
  /// Core calls it when a recipe or flag names this backend, before anything is allocated, and
  /// passes its result to error_bound() and quantize(); it must be cheap and allocate nothing.
  /// The default only calls resolve_options(option_schema(), user, context).
  virtual Json check_options(const Json& user, const std::string& context) const;
  /// Upper bound of the relative Frobenius error ||W - deq(quant(W))|| / ||W|| on a Gaussian
  /// matrix with these (resolved) options; the conformance suite holds the plugin to it.
  virtual double error_bound(const Json& options) const = 0;

  /// Quantizes W[out, in] (any float dtype, any device; the result lives on W's device).
  /// `options` are resolved (defaults filled); throws UserError on a bad value or shape.
  virtual std::unique_ptr<QuantizedWeight> quantize(const torch::Tensor& w,
                                                    const Json& options) const = 0;
  /// Rebuilds a weight from state() output; throws UserError naming the missing or bad key.
  virtual std::unique_ptr<QuantizedWeight> load(const TensorState& state) const = 0;
  /// Whether load() costs little next to one use of the weight (views or a copy of the state,
  /// some checks). A sharded base (dist.shard_base, sharded_base.h) rebuilds each layer with
  /// load() every time it gathers it; a backend whose load() recomputes something expensive
  /// returns false and sharding it is refused. The default is true.
  virtual bool load_is_cheap() const;
};

}  // namespace qtune
