// DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") as a qtune adapter
// plugin: the adapted weight is W' = m * V / ||V||_row with direction V = W + s * B @ A, a
// trainable magnitude m [out] initialised to the row norms of the (dequantized) base W, and the
// norm ||V|| detached from the graph as the paper (section 4.3) and HF PEFT do. Parameter names,
// options and adapter_config fields are PEFT's (LoraConfig with use_dora = true), so adapters
// trained here load in PEFT. Private to the plugin and its unit tests.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qtune/adapter.h"
#include "qtune/options.h"
#include "qtune/tensor_state.h"

namespace qtune::dora {

/// The plugin's options after checking (the names LoRA uses: DoRA is LoRA plus a magnitude).
struct DoraOptions {
  int64_t rank = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  bool use_rslora = false;
  std::string init = "kaiming";  // of A: "kaiming" or "gaussian"; B starts at 0

  /// From options completed by resolve_options; throws UserError naming adapter.options.<key>.
  static DoraOptions from_json(const Json& resolved);
  Json to_json() const;
  /// s: alpha / rank, or alpha / sqrt(rank) with use_rslora.
  double scale() const;
};

/// One factor matrix, a module of its own so its parameter is "lora_A.weight" / "lora_B.weight".
class DoraFactor : public torch::nn::Module {
 public:
  DoraFactor(int64_t rows, int64_t cols);
  torch::Tensor weight;
};

/// out = m / ||W + s B A||_row * (x W^T + s * dropout(x) A^T B^T), with A [r, in], B [out, r]
/// and m [out] fp32 masters. Needs bind_base() before use (the model builder calls it).
class DoraAdapter : public Adapter {
 public:
  DoraAdapter(int64_t in_features, int64_t out_features, const DoraOptions& options);

  /// Initialises the magnitude to ||W||_row (fp32) and keeps ||W||^2 per row for the norm.
  void bind_base(const AdapterBase& base) override;
  /// The whole projection output given the base output (see Adapter::apply), x's dtype.
  torch::Tensor apply(const torch::Tensor& x, const torch::Tensor& base_out) override;
  /// apply(x, W x) - W x: what the adapter adds to the base output.
  torch::Tensor forward(const torch::Tensor& x) override;
  /// m / ||V||_row * V - W, fp32 [out, in], V = W + s B A (dequantized W).
  torch::Tensor delta_weight() const override;
  /// {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"} (PEFT's saved keys) sharing
  /// storage with the parameters; meta with the options and feature sizes.
  TensorState state() const override;
  /// Copies the three tensors after checking keys, shapes, alpha and use_rslora.
  void load(const TensorState& state) override;
  /// PEFT LoraConfig fields with use_dora = true.
  Json peft_config() const override;
  void pretty_print(std::ostream& stream) const override;

  const torch::Tensor& lora_A() const { return a_->weight; }
  const torch::Tensor& lora_B() const { return b_->weight; }
  const torch::Tensor& magnitude() const { return magnitude_; }
  const DoraOptions& options() const { return options_; }

 private:
  /// ||W + s B A|| per row [out] in `dtype`, without materialising W + s B A:
  /// ||W_i||^2 + 2 s B_i . (A W^T)_i + s^2 B_i (A A^T) B_i^T. No gradient.
  torch::Tensor direction_norm(torch::ScalarType dtype) const;
  void check_bound() const;

  int64_t in_features_, out_features_;
  DoraOptions options_;
  double scale_;
  std::shared_ptr<DoraFactor> a_, b_;
  torch::Tensor magnitude_;     // parameter "lora_magnitude_vector" [out], fp32
  torch::Tensor base_norm_sq_;    // ||W_i||^2 [out], fp32 on the CPU, fixed (the base is frozen)
  AdapterBase base_;
};

/// The plugin's factory, named "dora".
class DoraFactory : public AdapterFactory {
 public:
  std::string name() const override { return "dora"; }
  std::vector<OptionSpec> option_schema() const override;
  /// The schema's types and the ranges of DoraOptions, before any adapter is built.
  Json check_options(const Json& user, const std::string& context) const override;
  std::shared_ptr<Adapter> create(int64_t in_features, int64_t out_features,
                                  const Json& options) const override;
};

}  // namespace qtune::dora
