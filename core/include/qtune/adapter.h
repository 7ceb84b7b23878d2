// The second interface the trainer knows: trainable low-rank weights beside one frozen base
// projection (Adapter), and the plugin-side factory that makes them (AdapterFactory).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "qtune/export.h"
#include "qtune/options.h"
#include "qtune/tensor_state.h"

namespace qtune {

/// What an adapter may use of the frozen base projection W [out, in] it sits beside.
struct QTUNE_API AdapterBase {
  /// W in the requested dtype on the base's device (dequantized for a quantized base; allocates).
  std::function<torch::Tensor(torch::ScalarType)> weight;
  /// x [..., in] -> x @ W^T [..., out] in x's dtype, without the bias, tile by tile for a
  /// quantized base (never all of W at once). Differentiable in x only.
  std::function<torch::Tensor(const torch::Tensor&)> linear;
};

/// Trainable parameters beside one base projection W[out, in]. A torch Module: its registered
/// parameters are what the optimizer trains; parameter names follow PEFT (lora_A.weight ...).
class QTUNE_API Adapter : public torch::nn::Module {
 public:
  ~Adapter() override;

  /// delta[..., out] added to the base output for x[..., in]; computed in x's dtype. Returns a
  /// zero tensor when disabled.
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
  /// The dense update ΔW[out, in] in fp32 such that base + adapter == x @ (W + ΔW)^T
  /// (dropout off). Used for merging.
  virtual torch::Tensor delta_weight() const = 0;
  /// Tensors under PEFT-relative keys ("lora_A.weight", "lora_B.weight") and the options.
  virtual TensorState state() const = 0;
  /// Copies tensors from a state of the same shapes; throws UserError naming a missing key or
  /// a shape mismatch.
  virtual void load(const TensorState& state) = 0;
  /// The adapter-specific fields of a PEFT adapter_config.json (peft_type, r, lora_alpha, ...).
  virtual Json peft_config() const = 0;

  /// The frozen base beside this adapter, for adapters whose update depends on it (DoRA's
  /// magnitude and weight norm). The model builder calls it once, right after create() and
  /// before any load(); the functions in `base` stay valid as long as the model. The default
  /// ignores it.
  virtual void bind_base(const AdapterBase& base);
  /// The projection's output for input x [..., in] given the base output y = x @ W^T [..., out]
  /// (without the base's bias, which the slot adds afterwards), in x's dtype. Called only while
  /// enabled. The default is y + forward(x); an adapter that rescales the base output (DoRA)
  /// overrides it.
  virtual torch::Tensor apply(const torch::Tensor& x, const torch::Tensor& base_out);

  /// A disabled adapter adds nothing (the reference model for KL terms, A/B evaluation).
  void set_enabled(bool enabled) { enabled_ = enabled; }
  bool enabled() const { return enabled_; }

 private:
  bool enabled_ = true;
};

/// An adapter plugin's factory.
class QTUNE_API AdapterFactory {
 public:
  virtual ~AdapterFactory();
  virtual std::string name() const = 0;
  /// Every option with its default (rank, alpha, dropout, use_rslora, init for LoRA).
  virtual std::vector<OptionSpec> option_schema() const = 0;
  /// Resolves and checks `user` options like QuantBackend::check_options (names keys
  /// `<context>.<key>`); called before anything is allocated. Default: resolve_options only.
  virtual Json check_options(const Json& user, const std::string& context) const;
  /// A new adapter for a projection in_features -> out_features with resolved options; its
  /// parameters are fp32 on CPU. Throws UserError on a bad option value.
  virtual std::shared_ptr<Adapter> create(int64_t in_features, int64_t out_features,
                                          const Json& options) const = 0;
};

}  // namespace qtune
