// Llama decoder and the slot builder (see model.h).
#include "qtune/model.h"


#include <cmath>
#include <functional>
#include <unordered_set>

#include <ATen/CPUGeneratorImpl.h>
#include <spdlog/spdlog.h>

#include "qtune/attention.h"
#include "qtune/cross_entropy.h"
#include "qtune/error.h"
#include "qtune/options.h"
#include "qtune/process.h"
#include "qtune/recompute.h"
#include "qtune/rope.h"
#include "qtune/sharded_base.h"

namespace F = torch::nn::functional;

namespace qtune {

// ---------------------------------------------------------------------------------------------
// LinearSlot

LinearSlotImpl::LinearSlotImpl(torch::Tensor weight, bool trainable, bool shared)
    : kind_(trainable ? Kind::kDense : Kind::kFrozenDense),
      in_(weight.size(1)),
      out_(weight.size(0)) {
  if (shared) {
    weight_ = weight;
  } else if (trainable) {
    weight_ = register_parameter("weight", weight, /*requires_grad=*/true);
  } else {
    weight_ = register_buffer("weight", weight);
  }
}

LinearSlotImpl::LinearSlotImpl(std::shared_ptr<QuantizedWeight> weight)
    : kind_(Kind::kQuantized), in_(weight->in_features()), out_(weight->out_features()) {
  base_ = register_module("base", QuantizedLinear(std::move(weight)));
}

torch::Tensor LinearSlotImpl::base_forward(const torch::Tensor& x) {
  if (kind_ == Kind::kQuantized) return base_->forward(x);
  // Trainable masters are fp32; the cast is differentiable, so bf16 compute still trains them.
  return F::linear(
      x, weight_.scalar_type() == x.scalar_type() ? weight_ : weight_.to(x.scalar_type()));
}

torch::Tensor LinearSlotImpl::forward(const torch::Tensor& x) {
  torch::Tensor y = base_forward(x);
  if (adapter_ && adapter_->enabled()) y = adapter_->apply(x, y);
  if (bias_.defined())
    y = y + (bias_.scalar_type() == y.scalar_type() ? bias_ : bias_.to(y.scalar_type()));
  return y;
}

void LinearSlotImpl::set_bias(torch::Tensor bias, bool trainable) {
  QTUNE_CHECK(bias.dim() == 1 && bias.size(0) == out_, "a projection with ", out_,
              " outputs needs a bias of shape [", out_, "], got ", bias.sizes());
  bias_ = trainable ? register_parameter("bias", bias, /*requires_grad=*/true)
                    : register_buffer("bias", bias);
}

void LinearSlotImpl::attach_adapter(std::shared_ptr<Adapter> adapter) {
  adapter_ = register_module("adapter", std::move(adapter));
  // The slot owns the adapter, so the adapter never outlives `this`.
  AdapterBase base;
  base.weight = [this](torch::ScalarType dtype) { return base_weight(dtype); };
  base.linear = [this](const torch::Tensor& x) { return base_forward(x); };
  adapter_->bind_base(base);
}

std::shared_ptr<QuantizedWeight> LinearSlotImpl::quantized() const {
  return kind_ == Kind::kQuantized ? base_->weight() : nullptr;
}

torch::Tensor LinearSlotImpl::base_weight(torch::ScalarType dtype) const {
  if (kind_ == Kind::kQuantized) return base_->weight()->dequantize(dtype, base_->weight()->device());
  return weight_.detach().to(dtype);
}

int64_t LinearSlotImpl::base_nbytes() const {
  if (kind_ == Kind::kQuantized) return base_->weight()->nbytes();
  return weight_.numel() * weight_.element_size();
}

// ---------------------------------------------------------------------------------------------
// Building blocks

RMSNormImpl::RMSNormImpl(torch::Tensor w, double eps, bool trainable) : eps_(eps) {
  weight = trainable ? register_parameter("weight", w) : register_buffer("weight", w);
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  const auto dtype = torch::promote_types(x.scalar_type(), torch::kFloat32);
  auto xf = x.to(dtype);
  auto y = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps_);
  return (y * weight.to(dtype)).to(x.scalar_type());
}

EmbeddingImpl::EmbeddingImpl(torch::Tensor w, bool trainable) {
  weight = trainable ? register_parameter("weight", w) : register_buffer("weight", w);
}

EmbeddingImpl::EmbeddingImpl(torch::Tensor shard, std::function<torch::Tensor()> gather)
    : gather_(std::move(gather)) {
  weight = register_buffer("weight", std::move(shard));
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& tokens) {
  return F::embedding(tokens, gather_ ? gather_() : weight);
}

namespace {

torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

// x [B, H, T, hd]; cos/sin [T, hd]
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  return x * cos + rotate_half(x) * sin;
}

// Causal attention where query i (absolute position q_offset + i) sees keys j with
// q_offset + i - window < j <= q_offset + i, as transformers' sliding_window_overlay
// (kv_idx > q_idx - window). q [B, H, T, D], k/v [B, KV, S, D] -> [B, H, T, D].
torch::Tensor sliding_window_attention(const torch::Tensor& q, torch::Tensor k, torch::Tensor v,
                                       int64_t q_offset, int64_t window) {
  const int64_t H = q.size(1), KV = k.size(1), T = q.size(2), S = k.size(2);
  if (KV != H) {
    k = k.repeat_interleave(H / KV, 1);
    v = v.repeat_interleave(H / KV, 1);
  }
  auto scores = torch::matmul(q * (1.0 / std::sqrt(static_cast<double>(q.size(3)))),
                              k.transpose(-2, -1));
  auto qi = torch::arange(q_offset, q_offset + T, torch::kLong).unsqueeze(1);
  auto kj = torch::arange(S, torch::kLong).unsqueeze(0);
  scores.masked_fill_((kj > qi).logical_or(kj <= qi - window),
                      -std::numeric_limits<float>::infinity());
  const auto softmax_dtype = torch::promote_types(q.scalar_type(), torch::kFloat32);
  return torch::matmul(torch::softmax(scores, -1, softmax_dtype).to(q.scalar_type()), v);
}

}  // namespace

AttentionImpl::AttentionImpl(const ModelConfig& c, LinearSlot q, LinearSlot k, LinearSlot v,
                             LinearSlot o)
    : heads_(c.num_attention_heads), kv_heads_(c.num_key_value_heads), head_dim_(c.head_dim()) {
  q_proj = register_module("q_proj", q);
  k_proj = register_module("k_proj", k);
  v_proj = register_module("v_proj", v);
  o_proj = register_module("o_proj", o);
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                     const torch::Tensor& sin, KVCache* cache, int64_t layer,
                                     const torch::Tensor& segments) {
  const int64_t B = x.size(0), T = x.size(1);
  auto q = q_proj->forward(x).view({B, T, heads_, head_dim_}).transpose(1, 2);
  auto k = k_proj->forward(x).view({B, T, kv_heads_, head_dim_}).transpose(1, 2);
  auto v = v_proj->forward(x).view({B, T, kv_heads_, head_dim_}).transpose(1, 2);
  q = apply_rope(q, cos, sin);
  k = apply_rope(k, cos, sin);

  int64_t start = 0;
  if (cache != nullptr) {
    start = cache->length;
    QTUNE_CHECK(start + T <= cache->k[layer].size(2), "KV cache full: ", start + T,
                " positions needed, capacity ", cache->k[layer].size(2));
    cache->k[layer].narrow(2, start, T).copy_(k);
    cache->v[layer].narrow(2, start, T).copy_(v);
    k = cache->k[layer].narrow(2, 0, start + T);
    v = cache->v[layer].narrow(2, 0, start + T);
  }
  torch::Tensor out;
  if (window_ > 0 && k.size(2) > window_) {
    // Mistral / Qwen2 sliding window: only once the keys reach beyond it.
    QTUNE_CHECK(!segments.defined(), "packed sequences (data.pack) longer than the model's "
                "sliding window (", window_, " tokens) are not supported; lower data.seq_len");
    out = sliding_window_attention(q, k, v, start, window_);
  } else {
    // Grouped-query, causal, within segments; never the [T, T] score matrix (attention.h).
    out = causal_attention(q, k, v, segments, start);
  }
  out = out.transpose(1, 2).reshape({B, T, heads_ * head_dim_});
  return o_proj->forward(out);
}

MlpImpl::MlpImpl(LinearSlot gate, LinearSlot up, LinearSlot down) {
  gate_proj = register_module("gate_proj", gate);
  up_proj = register_module("up_proj", up);
  down_proj = register_module("down_proj", down);
}

torch::Tensor MlpImpl::forward(const torch::Tensor& x) {
  return down_proj->forward(F::silu(gate_proj->forward(x)) * up_proj->forward(x));
}

DecoderLayerImpl::DecoderLayerImpl(RMSNorm in_norm, Attention attn, RMSNorm post_norm, Mlp mlp_) {
  input_layernorm = register_module("input_layernorm", in_norm);
  self_attn = register_module("self_attn", attn);
  post_attention_layernorm = register_module("post_attention_layernorm", post_norm);
  mlp = register_module("mlp", mlp_);
}

torch::Tensor DecoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                        const torch::Tensor& sin, KVCache* cache, int64_t layer,
                                        const torch::Tensor& segments) {
  auto h = x + self_attn->forward(input_layernorm->forward(x), cos, sin, cache, layer, segments);
  return h + mlp->forward(post_attention_layernorm->forward(h));
}

// ---------------------------------------------------------------------------------------------
// The model and its builder

namespace {

std::string layer_prefix(int64_t i) { return "model.layers." + std::to_string(i) + "."; }

// Fills the slots of one model from a weight source and a spec, in model order. Each frozen
// projection is quantized as soon as it is read, so peak memory stays near the quantized model
// plus one full-precision matrix.
class SlotBuilder {
 public:
  SlotBuilder(const ModelConfig& config, const WeightSource& weights, const TuningSpec& spec,
              torch::ScalarType master_dtype)
      : config_(config),
        weights_(weights),
        spec_(spec),
        master_dtype_(master_dtype),
        // Frozen dense tensors live in the compute dtype; trainable ones are fp32 masters.
        dense_dtype_(spec.trainable_base() ? master_dtype : spec.dtype) {
    // A pre-quantized directory is used as it was quantized: what it stores dense stays dense
    // (bitsandbytes' llm_int8_skip_modules, a skipped head).
    if (spec.quantized_base())
      for (const auto& n : weights.names())
        if (weights.has_quantized(n)) {
          prequantized_ = true;
          break;
        }
  }

  /// Whether projection `path` stays dense under a quantized base.
  bool keep_dense(const std::string& path) const {
    return module_matches(path, spec_.base.quant_skip_modules) ||
           (prequantized_ && !weights_.has_quantized(path + ".weight"));
  }

  /// Checks that `name` exists with `shape` (a quantized-only tensor is checked when loaded).
  void expect_shape(const std::string& name, const std::vector<int64_t>& shape) const {
    QTUNE_CHECK(weights_.has(name) || weights_.has_quantized(name), weights_.describe(),
                ": missing tensor ", name);
    if (weights_.has_quantized(name)) return;
    auto got = weights_.shape(name);
    QTUNE_CHECK(got == shape, weights_.describe(), ": tensor ", name, " has shape ",
                c10::IntArrayRef(got), ", expected ", c10::IntArrayRef(shape), " from config");
  }

  /// A packed state stored with the weights (a qtune-quantize directory) is loaded as is;
  /// otherwise the full-precision `source` tensor is quantized now and dropped.
  std::shared_ptr<QuantizedWeight> load_or_quantize(const std::string& name,
                                                    const std::string& source) const {
    const auto& quant = spec_.base.quant;
    const auto& shards = spec_.base.shards;
    const int64_t layer = decoder_layer_of(name);  // -1: the head
    const bool shard = shards && (layer >= 0 || name == "lm_head.weight");
    std::shared_ptr<QuantizedWeight> q;
    if (weights_.has_quantized(name)) {
      TensorState st = weights_.quantized(name);
      const std::string backend = st.meta.value("backend", "");
      QTUNE_CHECK(backend == quant->name(), weights_.describe(), ": ", name,
                  " was quantized with '", backend, "' but quant.name is '", quant->name(), "'");
      // A sharded base reads only this rank's bytes of the stored state.
      if (shard) return shards->shard(st, layer, weights_.describe() + ": module " + name);
      try {
        q = quant->load(st);
      } catch (const UserError& e) {  // the backend names the state key; say whose it is
        throw UserError(detail::concat(weights_.describe(), ": module ", name, ": ", e.what()));
      }
    } else {
      q = quant->quantize(weights_.get(source, torch::kFloat32), spec_.base.quant_options);
      return_freed_heap();
      if (shard) {  // keep this rank's shard, drop the rest now
        auto s = shards->shard(*q, layer, name);
        q.reset();
        return_freed_heap();
        return s;
      }
    }
    QTUNE_INTERNAL_ASSERT(q != nullptr, "quantization plugin '", quant->name(),
                          "' returned no weight for ", name);
    return q;
  }

  /// One projection slot: the heart of "QLoRA = LoRA with a quantized base".
  LinearSlot slot(const std::string& path, const std::string& short_name, int64_t out, int64_t in,
                  bool quantize) {
    const std::string name = path + ".weight";
    expect_shape(name, {out, in});
    quantize = quantize && !keep_dense(path);
    LinearSlot s{nullptr};
    if (quantize) {
      auto q = load_or_quantize(name, name);
      QTUNE_INTERNAL_ASSERT(q->out_features() == out && q->in_features() == in, "plugin '",
                            spec_.base.quant->name(), "' quantized ", name, " to shape [",
                            q->out_features(), ", ", q->in_features(), "], expected [", out, ", ",
                            in, "]");
      s = LinearSlot(std::move(q));
    } else {
      if (weights_.has_quantized(name) && !weights_.has(name))
        throw UserError(weights_.describe() + ": " + name + " is only stored quantized; " +
                        (spec_.quantized_base() ? "quant.skip_modules cannot keep it dense"
                                                : "use --train_type qlora with its backend"));
      s = LinearSlot(weights_.get(name, dense_dtype_), spec_.trainable_base());
    }
    if (config_.has_bias(short_name)) {
      // Biases stay dense: trained under full, frozen beside any (quantized) base otherwise.
      expect_shape(path + ".bias", {out});
      s->set_bias(weights_.get(path + ".bias", dense_dtype_), spec_.trainable_base());
    }
    attach(s, short_name, in, out);
    slots.emplace_back(path, s);
    return s;
  }

  /// The adapter of slot `short_name`, when the spec targets it.
  void attach(LinearSlot& s, const std::string& short_name, int64_t in, int64_t out) const {
    if (!spec_.adapter.targets(short_name)) return;
    auto a = spec_.adapter.factory->create(in, out, spec_.adapter.options);
    QTUNE_INTERNAL_ASSERT(a != nullptr, "adapter plugin '", spec_.adapter.factory->name(),
                          "' returned no adapter for a [", out, ", ", in, "] projection");
    s->attach_adapter(std::move(a));
  }

  /// The token embedding. Frozen and only looked up (no dense tied head multiplies by it), it
  /// stays in a stored dtype narrower than the compute dtype: the rows it returns convert
  /// exactly, and a bf16 checkpoint's table takes half the bytes under fp32 compute (1 GB of
  /// Llama-3-8B's 128k x 4096).
  /// With a sharded base (dist.shard_base) it is kept in shards too, gathered for each lookup.
  Embedding embedding() const {
    const std::string name = "model.embed_tokens.weight";
    expect_shape(name, {config_.vocab_size, config_.hidden_size});
    torch::ScalarType dtype = dense_dtype_;
    const bool shared_with_dense_head = config_.tie_word_embeddings && !head_quantized();
    const bool frozen = !spec_.trainable_base() && !shared_with_dense_head;
    if (frozen)
      if (const auto stored = weights_.stored_dtype(name);
          stored && torch::isFloatingType(*stored) &&
          c10::elementSize(*stored) < c10::elementSize(dtype))
        dtype = *stored;
    torch::Tensor table = weights_.get(name, dtype);
    if (!frozen || !spec_.base.shards) return Embedding(table, spec_.trainable_base());
    auto sharded = spec_.base.shards->shard_table(table, name);
    table.reset();
    return_freed_heap();
    return Embedding(sharded.shard, std::move(sharded.gather));
  }
  RMSNorm norm(const std::string& name) const {
    expect_shape(name, {config_.hidden_size});
    return RMSNorm(weights_.get(name, master_dtype_), config_.rms_norm_eps,
                   spec_.trainable_base());
  }

  /// Decoder layer `i`. One statement per slot: argument evaluation order is unspecified, and
  /// slots must be built (and listed) in model order.
  DecoderLayer layer(int64_t i) {
    const std::string p = layer_prefix(i);
    const int64_t dim = config_.hidden_size, hd = config_.head_dim();
    const int64_t q_out = config_.num_attention_heads * hd;
    const int64_t kv_out = config_.num_key_value_heads * hd;
    const int64_t ffn = config_.intermediate_size;
    const bool qz = spec_.quantized_base();
    auto in_norm = norm(p + "input_layernorm.weight");
    auto q = slot(p + "self_attn.q_proj", "q", q_out, dim, qz);
    auto k = slot(p + "self_attn.k_proj", "k", kv_out, dim, qz);
    auto v = slot(p + "self_attn.v_proj", "v", kv_out, dim, qz);
    auto o = slot(p + "self_attn.o_proj", "o", dim, q_out, qz);
    auto post_norm = norm(p + "post_attention_layernorm.weight");
    auto gate = slot(p + "mlp.gate_proj", "gate", ffn, dim, qz);
    auto up = slot(p + "mlp.up_proj", "up", ffn, dim, qz);
    auto down = slot(p + "mlp.down_proj", "down", dim, ffn, qz);
    auto attn = Attention(config_, q, k, v, o);
    attn->set_window(config_.attention_window(i));
    return DecoderLayer(in_norm, attn, post_norm, Mlp(gate, up, down));
  }

  /// The output head. Tied and kept dense, it is the embedding matrix itself (trained through
  /// it under full); tied and quantized, it is a quantized copy (the lookup keeps the dense one).
  LinearSlot head(const torch::Tensor& embedding) {
    const int64_t dim = config_.hidden_size, vocab = config_.vocab_size;
    const bool quantize = head_quantized();
    if (!config_.tie_word_embeddings) return slot("lm_head", "output", vocab, dim, quantize);
    LinearSlot h = quantize
                       ? LinearSlot(load_or_quantize("lm_head.weight", "model.embed_tokens.weight"))
                       : LinearSlot(embedding, spec_.trainable_base(), /*shared=*/true);
    attach(h, "output", dim, vocab);
    slots.emplace_back("lm_head", h);
    return h;
  }

  std::vector<std::pair<std::string, LinearSlot>> slots;

 private:
  bool head_quantized() const {
    return spec_.quantized_base() && !spec_.base.quant_skip_output && !keep_dense("lm_head");
  }

  const ModelConfig& config_;
  const WeightSource& weights_;
  const TuningSpec& spec_;
  torch::ScalarType master_dtype_, dense_dtype_;
  bool prequantized_ = false;
};

}  // namespace

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const ModelConfig& config, const WeightSource& weights,
                                           const TuningSpec& spec)
    : config_(config), spec_(spec) {
  config_.validate(weights.describe());
  spec.validate();
  SlotBuilder b(config_, weights, spec_, master_dtype());
  const bool trainable = spec.trainable_base();
  model = register_module("model", LlamaBackbone());
  model->embed_tokens = model->register_module("embed_tokens", b.embedding());
  model->layers = model->register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    model->layers->push_back(b.layer(i));
    spdlog::debug("built layer {}/{}", i + 1, config.num_hidden_layers);
  }
  model->norm = model->register_module("norm", b.norm("model.norm.weight"));
  lm_head = register_module("lm_head", b.head(model->embed_tokens->weight));
  slots_ = std::move(b.slots);

  inv_freq_ = rope_inv_freq(config, config.max_position_embeddings);
  // What the build freed (full-precision copies, conversion scratch) has the weights' sizes,
  // which training's activations rarely match; kept, it would add to the training peak (lora
  // 7B:2 by 360 MB).
  return_freed_heap(0);
}

std::pair<torch::Tensor, torch::Tensor> LlamaForCausalLMImpl::rope(int64_t start, int64_t length,
                                                                   const torch::Tensor& positions,
                                                                   torch::ScalarType dtype) const {
  // fp64 angles either way, so positions 0, 1, ... given explicitly give the default's values.
  // Dynamic NTK scaling stretches the frequencies with the sequence's length (rope.h).
  const torch::Tensor inv_freq = rope_depends_on_length(config_)
                                     ? rope_inv_freq(config_, positions.defined()
                                                                  ? positions.max().item<int64_t>() + 1
                                                                  : start + length)
                                     : inv_freq_;
  torch::Tensor freqs;
  if (positions.defined()) {
    freqs = (positions.to(torch::kFloat64).unsqueeze(-1) * inv_freq).unsqueeze(1);  // [B,1,T,hd/2]
  } else {
    freqs = torch::outer(torch::arange(start, start + length, torch::kFloat64), inv_freq);
  }
  auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

namespace {

// positions / segments: int64 [B, T] like the tokens, or undefined.
void check_layout(const torch::Tensor& tokens, const torch::Tensor& t, const char* name) {
  if (!t.defined()) return;
  QTUNE_CHECK(t.scalar_type() == torch::kLong && t.sizes() == tokens.sizes(), name,
              " must be int64 [batch, time] like the tokens ", tokens.sizes(), ", got ",
              t.scalar_type(), " ", t.sizes());
}

}  // namespace

torch::Tensor LlamaForCausalLMImpl::hidden_states(const torch::Tensor& tokens, KVCache* cache,
                                                  const torch::Tensor& positions,
                                                  const torch::Tensor& segments) {
  QTUNE_CHECK(tokens.dim() == 2, "tokens must be [batch, time], got ", tokens.sizes());
  check_layout(tokens, positions, "positions");
  check_layout(tokens, segments, "segments");
  QTUNE_CHECK(!positions.defined() || tokens.numel() == 0 || positions.min().item<int64_t>() >= 0,
              "positions must be >= 0");
  QTUNE_CHECK(!(segments.defined() && cache),
              "segments (packed sequences) cannot be used with a KV cache");
  const int64_t start = cache ? cache->length : 0;
  auto [cos, sin] = rope(start, tokens.size(1), positions, spec_.dtype);
  auto h = model->embed_tokens->forward(tokens).to(spec_.dtype);
  for (size_t i = 0; i < model->layers->size(); ++i) {
    auto layer = model->layers->ptr<DecoderLayerImpl>(i);
    if (checkpointing_ && cache == nullptr && torch::GradMode::is_enabled()) {
      // The layer's trainable parameters go in as inputs of the checkpoint: under lora/qlora the
      // first layer's input does not require grad, and its adapters are all that trains.
      DecoderLayerImpl* l = layer.get();
      h = recompute_in_backward(
          [l, cos = cos, sin = sin, segments](const std::vector<torch::Tensor>& in) {
            return l->forward(in[0], cos, sin, nullptr, 0, segments);
          },
          {h}, l->parameters());
    } else {
      h = layer->forward(h, cos, sin, cache, static_cast<int64_t>(i), segments);
    }
  }
  if (cache) cache->length += tokens.size(1);
  return model->norm->forward(h);
}

torch::Tensor LlamaForCausalLMImpl::forward(const torch::Tensor& tokens, KVCache* cache,
                                            const torch::Tensor& positions,
                                            const torch::Tensor& segments) {
  return lm_head->forward(hidden_states(tokens, cache, positions, segments)).to(master_dtype());
}

namespace {
// Tokens per chunk of the loss: about 8M logits (32 MB in fp32) at a time: 262 tokens of
// Llama-2's 32000-word vocabulary, 65 of Llama-3's 128256, the whole batch of a small model.
constexpr int64_t kLossChunkLogits = int64_t{1} << 23;
}  // namespace

std::pair<torch::Tensor, int64_t> LlamaForCausalLMImpl::loss(const torch::Tensor& tokens,
                                                             const torch::Tensor& targets,
                                                             const torch::Tensor& positions,
                                                             const torch::Tensor& segments) {
  QTUNE_CHECK(targets.sizes() == tokens.sizes(), "targets ", targets.sizes(),
              " must have the tokens' shape ", tokens.sizes());
  auto h = hidden_states(tokens, nullptr, positions, segments);
  auto flat_targets = targets.reshape({-1});
  const int64_t count = flat_targets.ne(-100).sum().item<int64_t>();
  // What the head reads besides its input: its adapter's parameters and, under full, its
  // weight (when tied, the embedding's: not a parameter of the slot).
  std::vector<torch::Tensor> head_params = lm_head->parameters();
  if (lm_head->dense().defined()) head_params.push_back(lm_head->dense());
  LinearSlotImpl* head = lm_head.get();
  auto l = chunked_cross_entropy(
      h.reshape({-1, h.size(-1)}), flat_targets,
      [head](const torch::Tensor& x) { return head->forward(x); }, head_params,
      std::max<int64_t>(1, kLossChunkLogits / config_.vocab_size), master_dtype());
  return {l, count};
}

KVCache LlamaForCausalLMImpl::new_cache(int64_t batch, int64_t capacity) const {
  KVCache c;
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i) {
    c.k.push_back(torch::zeros({batch, config_.num_key_value_heads, capacity, config_.head_dim()},
                               torch::TensorOptions().dtype(spec_.dtype)));
    c.v.push_back(torch::zeros_like(c.k.back()));
  }
  return c;
}

std::vector<std::pair<std::string, torch::Tensor>> LlamaForCausalLMImpl::trainable_parameters()
    const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  std::unordered_set<const void*> seen;
  for (const auto& p : named_parameters(/*recurse=*/true)) {
    if (!p.value().requires_grad()) continue;
    if (!seen.insert(p.value().unsafeGetTensorImpl()).second) continue;
    out.emplace_back(p.key(), p.value());
  }
  return out;
}

int64_t LlamaForCausalLMImpl::num_trainable_parameters() const {
  int64_t n = 0;
  for (const auto& [_, t] : trainable_parameters()) n += t.numel();
  return n;
}

namespace {
// Sums base bytes. Dense tensors are counted once per storage (a tied head is the embedding);
// a quantized weight counts what its backend's nbytes() says it holds.
struct ByteCounter {
  std::unordered_set<const void*> seen;
  int64_t total = 0;
  void add(const torch::Tensor& t) {
    if (!t.defined()) return;
    if (!seen.insert(t.storage().unsafeGetStorageImpl()).second) return;
    total += static_cast<int64_t>(t.storage().nbytes());
  }
  void add_slot(const LinearSlotImpl& slot) {
    if (auto q = slot.quantized()) {
      total += q->nbytes();  // the backend's count: held tensors, without process-wide tables
    } else {
      add(slot.dense());
    }
    add(slot.bias());
  }
};
}  // namespace

int64_t LlamaForCausalLMImpl::linear_weight_bytes() const {
  ByteCounter c;
  for (const auto& [_, slot] : slots_) c.add_slot(*slot);
  return c.total;
}

int64_t LlamaForCausalLMImpl::base_weight_bytes() const {
  ByteCounter c;
  for (const auto& [_, slot] : slots_) c.add_slot(*slot);
  c.add(model->embed_tokens->weight);
  c.add(model->norm->weight);
  for (size_t i = 0; i < model->layers->size(); ++i) {
    auto layer = model->layers->ptr<DecoderLayerImpl>(i);
    c.add(layer->input_layernorm->weight);
    c.add(layer->post_attention_layernorm->weight);
  }
  return c.total;
}

void LlamaForCausalLMImpl::set_adapters_enabled(bool on) {
  for (auto& [_, slot] : slots_)
    if (slot->adapter()) slot->adapter()->set_enabled(on);
}

// ---------------------------------------------------------------------------------------------
// Random weights

namespace {

class RandomWeights : public WeightSource {
 public:
  RandomWeights(const ModelConfig& c, uint64_t seed) : c_(c), seed_(seed) {
    const int64_t dim = c.hidden_size, hd = c.head_dim();
    shapes_["model.embed_tokens.weight"] = {c.vocab_size, dim};
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      const auto p = layer_prefix(i);
      shapes_[p + "self_attn.q_proj.weight"] = {c.num_attention_heads * hd, dim};
      shapes_[p + "self_attn.k_proj.weight"] = {c.num_key_value_heads * hd, dim};
      shapes_[p + "self_attn.v_proj.weight"] = {c.num_key_value_heads * hd, dim};
      shapes_[p + "self_attn.o_proj.weight"] = {dim, c.num_attention_heads * hd};
      shapes_[p + "mlp.gate_proj.weight"] = {c.intermediate_size, dim};
      shapes_[p + "mlp.up_proj.weight"] = {c.intermediate_size, dim};
      shapes_[p + "mlp.down_proj.weight"] = {dim, c.intermediate_size};
      shapes_[p + "input_layernorm.weight"] = {dim};
      shapes_[p + "post_attention_layernorm.weight"] = {dim};
      const int64_t outs[] = {c.num_attention_heads * hd, c.num_key_value_heads * hd,
                              c.num_key_value_heads * hd, dim, c.intermediate_size,
                              c.intermediate_size, dim};
      const char* names[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
      const char* shorts[] = {"q", "k", "v", "o", "gate", "up", "down"};
      for (int s = 0; s < 7; ++s)
        if (c.has_bias(shorts[s])) shapes_[p + names[s] + ".bias"] = {outs[s]};
    }
    shapes_["model.norm.weight"] = {dim};
    if (!c.tie_word_embeddings) shapes_["lm_head.weight"] = {c.vocab_size, dim};
  }
  std::string describe() const override { return "random weights (seed " + std::to_string(seed_) + ")"; }
  bool has(const std::string& n) const override { return shapes_.count(n) > 0; }
  std::vector<int64_t> shape(const std::string& n) const override {
    QTUNE_CHECK(has(n), describe(), ": no tensor ", n);
    return shapes_.at(n);
  }
  torch::Tensor get(const std::string& n, torch::ScalarType dtype) const override {
    const auto s = shape(n);
    const bool bias = n.size() > 5 && n.compare(n.size() - 5, 5, ".bias") == 0;
    if (s.size() == 1 && !bias) return torch::ones(s, torch::TensorOptions().dtype(dtype));
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed_ ^ std::hash<std::string>{}(n));
    return (torch::randn(s, gen, torch::TensorOptions()) * 0.02).to(dtype);
  }
  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    for (const auto& [k, _] : shapes_) out.push_back(k);
    return out;
  }

 private:
  ModelConfig c_;
  uint64_t seed_;
  std::map<std::string, std::vector<int64_t>> shapes_;
};

}  // namespace

namespace {

class ModelWeights : public WeightSource {
 public:
  ModelWeights(const LlamaForCausalLMImpl& m, bool merge) : m_(m), merge_(merge) {
    for (const auto& [path, slot] : m.slots()) slots_[path + ".weight"] = slot.get();
    auto add = [&](const std::string& n, const torch::Tensor& t) { dense_[n] = t; };
    for (const auto& [path, slot] : m.slots())
      if (slot->bias().defined()) add(path + ".bias", slot->bias());
    QTUNE_CHECK(!m.model->embed_tokens->sharded(),
                "the model's base is sharded over ranks (dist.shard_base): its weights cannot be "
                "read whole in one rank");
    add("model.embed_tokens.weight", m.model->embed_tokens->weight);
    add("model.norm.weight", m.model->norm->weight);
    for (size_t i = 0; i < m.model->layers->size(); ++i) {
      auto layer = m.model->layers->ptr<DecoderLayerImpl>(i);
      add(layer_prefix(i) + "input_layernorm.weight", layer->input_layernorm->weight);
      add(layer_prefix(i) + "post_attention_layernorm.weight",
          layer->post_attention_layernorm->weight);
    }
    // A tied head is the embedding; HF's tied layout has no lm_head.weight.
    if (m.config().tie_word_embeddings) {
      QTUNE_CHECK(!(merge && m.lm_head->adapter()),
                  "cannot merge an adapter on the output head of a model with tied embeddings "
                  "(the merged head would no longer equal the embedding)");
      slots_.erase("lm_head.weight");
    }
  }
  std::string describe() const override { return "the trained model"; }
  bool has(const std::string& n) const override { return slots_.count(n) || dense_.count(n); }
  std::vector<int64_t> shape(const std::string& n) const override {
    if (auto it = slots_.find(n); it != slots_.end())
      return {it->second->out_features(), it->second->in_features()};
    QTUNE_CHECK(dense_.count(n), describe(), ": no tensor ", n);
    return dense_.at(n).sizes().vec();
  }
  torch::Tensor get(const std::string& n, torch::ScalarType dtype) const override {
    torch::NoGradGuard no_grad;
    if (auto it = slots_.find(n); it != slots_.end()) {
      auto w = it->second->base_weight(torch::kFloat32).to(torch::kCPU);
      if (merge_ && it->second->adapter())
        w = w + it->second->adapter()->delta_weight().to(torch::kCPU);
      return w.to(dtype).contiguous();
    }
    QTUNE_CHECK(dense_.count(n), describe(), ": no tensor ", n);
    return dense_.at(n).detach().to(torch::kCPU).to(dtype).clone();
  }
  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    for (const auto& [k, _] : slots_) out.push_back(k);
    for (const auto& [k, _] : dense_) out.push_back(k);
    return out;
  }

 private:
  const LlamaForCausalLMImpl& m_;
  bool merge_;
  std::map<std::string, const LinearSlotImpl*> slots_;
  std::map<std::string, torch::Tensor> dense_;
};

}  // namespace

std::unique_ptr<WeightSource> model_weights(const LlamaForCausalLMImpl& model, bool merge_adapters) {
  return std::make_unique<ModelWeights>(model, merge_adapters);
}

std::unique_ptr<WeightSource> random_weights(const ModelConfig& config, uint64_t seed) {
  return std::make_unique<RandomWeights>(config, seed);
}

}  // namespace qtune
