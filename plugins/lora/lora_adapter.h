// LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as a qtune adapter
// plugin, with HF PEFT's parameter names, initialisations and adapter_config fields, so an adapter
// trained here loads in PEFT and the other way round. Private to the plugin and its unit tests.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qtune/adapter.h"
#include "qtune/options.h"
#include "qtune/tensor_state.h"

namespace qtune::lora {

/// The plugin's options after checking. Names are what a recipe writes under adapter.options.
struct LoraOptions {
  int64_t rank = 8;              // r: inner dimension of the update
  double alpha = 16.0;           // lora_alpha
  double dropout = 0.0;          // probability applied to the adapter's input in training mode
  bool use_rslora = false;       // rank-stabilised scale alpha / sqrt(r) instead of alpha / r
  std::string init = "kaiming";  // "kaiming" (PEFT's init_lora_weights=True) or "gaussian"

  /// From options already completed by resolve_options; throws UserError naming
  /// `adapter.options.<key>` and the bad value when a value is out of range.
  static LoraOptions from_json(const Json& resolved);
  Json to_json() const;
  /// The factor applied to B @ A: alpha / rank, or alpha / sqrt(rank) with use_rslora.
  double scale() const;
};

/// One bias-free factor matrix. A module of its own so parameter paths read "lora_A.weight" and
/// "lora_B.weight" exactly as in PEFT.
class LoraFactor : public torch::nn::Module {
 public:
  /// A zero fp32 matrix [rows, cols] on the CPU, registered as the trainable parameter "weight".
  LoraFactor(int64_t rows, int64_t cols);
  torch::Tensor weight;
};

/// delta(x) = dropout(x) @ A^T @ B^T * scale with A [r, in], B [out, r], kept fp32 (master
/// weights); the product is computed in x's dtype through a differentiable cast.
class LoraAdapter : public Adapter {
 public:
  /// Parameters are created fp32 on the CPU and initialised from torch's global generator
  /// (the trainer's seed decides): A by `options.init`, B = 0, so the initial delta is exactly 0.
  LoraAdapter(int64_t in_features, int64_t out_features, const LoraOptions& options);

  /// x [..., in] of any floating dtype -> delta [..., out] in x's dtype; zeros when disabled.
  torch::Tensor forward(const torch::Tensor& x) override;
  /// scale * B @ A, fp32 [out, in], on the parameters' device. Differentiable in A and B.
  torch::Tensor delta_weight() const override;
  /// {"lora_A.weight", "lora_B.weight"} sharing storage with the parameters, meta with the
  /// options and the feature sizes.
  TensorState state() const override;
  /// Copies both tensors (any floating dtype, converted) after checking keys, shapes and that
  /// alpha / use_rslora in the state's meta (when present) match this adapter's.
  void load(const TensorState& state) override;
  /// HF PEFT LoraConfig fields: peft_type, r, lora_alpha, lora_dropout, use_rslora,
  /// init_lora_weights, bias, fan_in_fan_out, task_type.
  Json peft_config() const override;
  void pretty_print(std::ostream& stream) const override;

  const LoraOptions& options() const { return options_; }
  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  /// The A [r, in] and B [out, r] parameters.
  const torch::Tensor& lora_A() const { return a_->weight; }
  const torch::Tensor& lora_B() const { return b_->weight; }

 private:
  int64_t in_features_;
  int64_t out_features_;
  LoraOptions options_;
  double scale_;
  std::shared_ptr<LoraFactor> a_;
  std::shared_ptr<LoraFactor> b_;
};

/// The plugin's factory, named "lora".
class LoraFactory : public AdapterFactory {
 public:
  std::string name() const override { return "lora"; }
  std::vector<OptionSpec> option_schema() const override;
  /// resolve_options plus the ranges (rank > 0, alpha > 0, dropout in [0, 1), init).
  Json check_options(const Json& user, const std::string& context) const override;
  /// Resolves `options` against the schema (so an unresolved or partial object works too),
  /// range-checks them and returns a fresh adapter.
  std::shared_ptr<Adapter> create(int64_t in_features, int64_t out_features,
                                  const Json& options) const override;
};

}  // namespace qtune::lora
