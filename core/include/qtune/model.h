// The Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or untied head)
// and the builder that fills every projection slot according to the tuning spec:
//   full  -> dense trainable weight
//   lora  -> dense frozen weight + adapter (on targeted slots)
//   qlora -> quantized frozen weight + adapter (every frozen linear is quantized)
// QLoRA is LoRA with a quantized base: one builder, one code path.
#pragma once

#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "qtune/adapter.h"
#include "qtune/export.h"
#include "qtune/model_config.h"
#include "qtune/quantized_linear.h"
#include "qtune/quantized_weight.h"
#include "qtune/tuning_spec.h"
#include "qtune/weight_source.h"

namespace qtune {

/// One projection y = x @ W^T (+ adapter(x)). The base is a dense trainable parameter, a dense
/// frozen buffer, or a QuantizedLinear; an adapter (submodule "adapter") is optional.
class QTUNE_API LinearSlotImpl : public torch::nn::Module {
 public:
  enum class Kind { kDense, kFrozenDense, kQuantized };
  /// Dense: `weight` [out, in] becomes parameter "weight" (trainable) or buffer "weight".
  /// `shared` = true keeps the tensor unregistered (a tied head that belongs to the embedding).
  LinearSlotImpl(torch::Tensor weight, bool trainable, bool shared = false);
  /// Quantized frozen base (its packed tensors become buffers of submodule "base").
  explicit LinearSlotImpl(std::shared_ptr<QuantizedWeight> weight);

  torch::Tensor forward(const torch::Tensor& x);
  /// x @ W^T through the base alone (no bias, no adapter).
  torch::Tensor base_forward(const torch::Tensor& x);
  void attach_adapter(std::shared_ptr<Adapter> adapter);
  /// Adds a bias [out] (Qwen2's q/k/v): parameter "bias" when trainable, else buffer "bias".
  /// It stays dense whatever the base is, and adapters never see it.
  void set_bias(torch::Tensor bias, bool trainable);

  Kind kind() const { return kind_; }
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }
  const std::shared_ptr<Adapter>& adapter() const { return adapter_; }
  std::shared_ptr<QuantizedWeight> quantized() const;
  /// The dense base weight tensor (undefined for quantized slots).
  const torch::Tensor& dense() const { return weight_; }
  /// The bias [out], undefined when the projection has none.
  const torch::Tensor& bias() const { return bias_; }
  /// The base as a dense [out, in] matrix (dequantized if needed), adapter not included.
  torch::Tensor base_weight(torch::ScalarType dtype) const;
  /// Bytes the base really holds (quantized: nbytes(); dense: numel * element size).
  int64_t base_nbytes() const;

 private:
  Kind kind_;
  int64_t in_ = 0, out_ = 0;
  torch::Tensor weight_;
  torch::Tensor bias_;
  QuantizedLinear base_{nullptr};
  std::shared_ptr<Adapter> adapter_;
};
TORCH_MODULE(LinearSlot);

/// Root-mean-square norm with a learned scale, computed in fp32.
class QTUNE_API RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(torch::Tensor weight, double eps, bool trainable);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

/// Keys and values of every layer for incremental decoding.
struct QTUNE_API KVCache {
  std::vector<torch::Tensor> k, v;  // per layer [B, kv_heads, capacity, head_dim]
  int64_t length = 0;               // positions filled
};

class QTUNE_API AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(const ModelConfig& c, LinearSlot q, LinearSlot k, LinearSlot v, LinearSlot o);
  /// x [B, T, dim]; cos/sin [T, head_dim] (or [B, 1, T, head_dim], per token) for the positions
  /// of x; cache may be null; segments [B, T] int64 or undefined (see LlamaForCausalLM::forward).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        KVCache* cache, int64_t layer, const torch::Tensor& segments = {});
  /// Sliding-window attention: a query sees itself and the `window` - 1 keys before it; 0 (the
  /// default) is full causal attention.
  void set_window(int64_t window) { window_ = window; }
  LinearSlot q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};

 private:
  int64_t heads_, kv_heads_, head_dim_;
  int64_t window_ = 0;
};
TORCH_MODULE(Attention);

class QTUNE_API MlpImpl : public torch::nn::Module {
 public:
  MlpImpl(LinearSlot gate, LinearSlot up, LinearSlot down);
  torch::Tensor forward(const torch::Tensor& x);
  LinearSlot gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(Mlp);

class QTUNE_API DecoderLayerImpl : public torch::nn::Module {
 public:
  DecoderLayerImpl(RMSNorm in_norm, Attention attn, RMSNorm post_norm, Mlp mlp);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        KVCache* cache, int64_t layer, const torch::Tensor& segments = {});
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  Attention self_attn{nullptr};
  Mlp mlp{nullptr};
};
TORCH_MODULE(DecoderLayer);

/// Holds the embedding ("weight" [vocab, dim]) so module paths match Hugging Face's.
class QTUNE_API EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(torch::Tensor weight, bool trainable);
  /// Sharded over ranks (BaseShards::shard_table): "weight" is this rank's bytes, and each
  /// lookup gathers the whole table with `gather`.
  EmbeddingImpl(torch::Tensor shard, std::function<torch::Tensor()> gather);
  torch::Tensor forward(const torch::Tensor& tokens);
  bool sharded() const { return static_cast<bool>(gather_); }
  torch::Tensor weight;

 private:
  std::function<torch::Tensor()> gather_;
};
TORCH_MODULE(Embedding);

/// The decoder stack ("model." in Hugging Face names).
class QTUNE_API LlamaBackboneImpl : public torch::nn::Module {
 public:
  LlamaBackboneImpl() = default;
  Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
};
TORCH_MODULE(LlamaBackbone);

/// A Llama causal LM: parameter and buffer paths are the Hugging Face ones
/// ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight").
class QTUNE_API LlamaForCausalLMImpl : public torch::nn::Module {
 public:
  /// Builds the model slot by slot from `weights`, quantizing each frozen projection as soon as
  /// it is read (peak memory ~ the quantized model + one full-precision matrix).
  LlamaForCausalLMImpl(const ModelConfig& config, const WeightSource& weights,
                       const TuningSpec& spec);

  /// Dtype of trainable masters and of logits: the compute dtype promoted to at least fp32.
  torch::ScalarType master_dtype() const {
    return torch::promote_types(spec_.dtype, torch::kFloat32);
  }
  /// tokens [B, T] int64 -> logits [B, T, vocab] in master_dtype() (fp32 unless fp64). With a
  /// cache, tokens continue at position cache->length and the cache is extended.
  /// Packed sequences (several examples in one row), both undefined by default:
  /// `positions` [B, T] int64 >= 0 are the RoPE positions of the tokens (restarting at 0 for
  /// each packed example; default cache->length + 0, 1, ...); `segments` [B, T] int64 restricts
  /// attention to keys of the query's own segment id (causal and block-diagonal), not with a cache.
  torch::Tensor forward(const torch::Tensor& tokens, KVCache* cache = nullptr,
                        const torch::Tensor& positions = {}, const torch::Tensor& segments = {});
  /// Mean cross-entropy over targets != -100 (master_dtype() scalar), and the number of such
  /// targets; `positions` and `segments` as for forward(). The vocabulary-sized logits exist
  /// only a chunk of tokens at a time (see chunked_cross_entropy).
  std::pair<torch::Tensor, int64_t> loss(const torch::Tensor& tokens, const torch::Tensor& targets,
                                         const torch::Tensor& positions = {},
                                         const torch::Tensor& segments = {});

  /// A cache sized for `batch` sequences of up to `capacity` positions.
  KVCache new_cache(int64_t batch, int64_t capacity) const;

  const ModelConfig& config() const { return config_; }
  const TuningSpec& spec() const { return spec_; }
  /// Every projection slot by module path ("model.layers.0.self_attn.q_proj", "lm_head").
  const std::vector<std::pair<std::string, LinearSlot>>& slots() const { return slots_; }
  /// Parameters the optimizer trains (requires_grad), with their paths.
  std::vector<std::pair<std::string, torch::Tensor>> trainable_parameters() const;
  int64_t num_trainable_parameters() const;
  /// Parameters of the dense model this one represents (what the config implies).
  int64_t num_total_parameters() const { return config_.num_parameters(); }
  /// Bytes held by the frozen/trainable base projections (all slots' bases).
  int64_t linear_weight_bytes() const;
  /// Bytes of the whole base: projections + embedding + norms (adapters excluded).
  int64_t base_weight_bytes() const;
  /// Recompute each decoder layer in backward instead of keeping its activations.
  void set_activation_checkpointing(bool on) { checkpointing_ = on; }
  /// Turns every adapter on or off (off = the base model).
  void set_adapters_enabled(bool on);

  LlamaBackbone model{nullptr};
  LinearSlot lm_head{nullptr};

 private:
  ModelConfig config_;
  TuningSpec spec_;
  std::vector<std::pair<std::string, LinearSlot>> slots_;
  torch::Tensor inv_freq_;
  bool checkpointing_ = false;
  // cos/sin [T, head_dim] for positions start.., or [B, 1, T, head_dim] for given positions.
  std::pair<torch::Tensor, torch::Tensor> rope(int64_t start, int64_t length,
                                               const torch::Tensor& positions,
                                               torch::ScalarType dtype) const;
  // The final-norm hidden states [B, T, dim] in the compute dtype (what the head reads).
  torch::Tensor hidden_states(const torch::Tensor& tokens, KVCache* cache,
                              const torch::Tensor& positions, const torch::Tensor& segments);
};
TORCH_MODULE(LlamaForCausalLM);

/// The model's weights as a WeightSource in Hugging Face names, fp32 masters or frozen tensors
/// converted on get(): quantized bases are dequantized; with `merge_adapters`, each adapter's
/// delta_weight() is added onto its (dequantized) base. The model must outlive the source.
/// This is what full-model saving and merged export write.
QTUNE_API std::unique_ptr<WeightSource> model_weights(const LlamaForCausalLMImpl& model,
                                                      bool merge_adapters);

/// Random weights for a config (normal, std 0.02; norms 1): a WeightSource for benchmarks and
/// tests at sizes no file holds. Tensors are generated on demand from (seed, name).
QTUNE_API std::unique_ptr<WeightSource> random_weights(const ModelConfig& config, uint64_t seed);

}  // namespace qtune
