// Llama decoder and the slot builder (see model.h).
#include "qtune/model.h"

#include <fnmatch.h>

#include <cmath>
#include <functional>
#include <mutex>
#include <unordered_set>

#include <ATen/CPUGeneratorImpl.h>
#include <spdlog/spdlog.h>

#include "qtune/error.h"
#include "qtune/options.h"
#include "qtune/rope.h"
#include "process.h"

namespace F = torch::nn::functional;

namespace qtune {

// ---------------------------------------------------------------------------------------------
// Parsing helpers

TrainType parse_train_type(const std::string& s) {
  if (s == "full") return TrainType::kFull;
  if (s == "lora") return TrainType::kLora;
  if (s == "qlora") return TrainType::kQlora;
  throw UserError("train_type must be one of full, lora, qlora; got '" + s + "'");
}

std::string to_string(TrainType t) {
  switch (t) {
    case TrainType::kFull: return "full";
    case TrainType::kLora: return "lora";
    case TrainType::kQlora: return "qlora";
  }
  return "?";
}

torch::ScalarType parse_dtype(const std::string& s, const std::string& key) {
  if (s == "fp32" || s == "float32") return torch::kFloat32;
  if (s == "bf16" || s == "bfloat16") return torch::kBFloat16;
  throw UserError(key + " must be fp32 or bf16, got '" + s + "'");
}

const std::vector<std::string>& all_target_modules() {
  static const std::vector<std::string> names{"q", "k", "v", "o", "gate", "up", "down", "output"};
  return names;
}

std::set<std::string> parse_target_modules(const std::vector<std::string>& names,
                                           const std::string& key) {
  std::set<std::string> out;
  const auto& all = all_target_modules();
  for (const auto& raw : names) {
    std::string n = raw;
    // Accept the Hugging Face spellings too (q_proj, lm_head), as PEFT users write them.
    if (n.size() > 5 && n.compare(n.size() - 5, 5, "_proj") == 0) n = n.substr(0, n.size() - 5);
    if (n == "lm_head") n = "output";
    if (n == "all-linear") {
      // PEFT's all-linear leaves the output head out; so do we.
      for (const auto& a : all)
        if (a != "output") out.insert(a);
      continue;
    }
    QTUNE_CHECK(std::find(all.begin(), all.end(), n) != all.end(), key, " has unknown module '",
                raw, "' (expected any of q, k, v, o, gate, up, down, output, or all-linear)");
    out.insert(n);
  }
  QTUNE_CHECK(!out.empty(), key, " must name at least one module");
  return out;
}

bool module_matches(const std::string& path, const std::vector<std::string>& patterns) {
  const std::string dotted = "." + path + ".";
  for (const auto& p : patterns) {
    if (p.find_first_of("*?[") != std::string::npos) {
      if (fnmatch(p.c_str(), path.c_str(), 0) == 0) return true;
    } else if (!p.empty() && dotted.find("." + p + ".") != std::string::npos) {
      return true;
    }
  }
  return false;
}

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

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& tokens) {
  return F::embedding(tokens, weight);
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
                                     const torch::Tensor& sin, KVCache* cache, int64_t layer) {
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
  // Mistral / Qwen2 sliding window: only once the keys reach beyond it.
  if (window_ > 0 && k.size(2) > window_) {
    auto out = sliding_window_attention(q, k, v, start, window_);
    return o_proj->forward(out.transpose(1, 2).reshape({B, T, heads_ * head_dim_}));
  }
  const int64_t S = k.size(2);
  if (kv_heads_ != heads_) {
    // Grouped-query attention: each kv head serves heads/kv_heads consecutive query heads.
    k = k.repeat_interleave(heads_ / kv_heads_, 1);
    v = v.repeat_interleave(heads_ / kv_heads_, 1);
  }
  torch::Tensor out;
#if TORCH_VERSION_MAJOR >= 2
  if (start == 0) {
    out = at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true);
  }
#endif
  if (!out.defined()) {
    // The [B, H, T, S] score tensor is the largest activation: scale q before the product and
    // mask in place, so only the product and the softmax allocate at that size.
    auto scores = torch::matmul(q * (1.0 / std::sqrt(static_cast<double>(head_dim_))),
                                k.transpose(-2, -1));
    if (T > 1) {
      // query i (absolute position start+i) may see keys 0..start+i
      auto qi = torch::arange(start, start + T, torch::kLong).unsqueeze(1);
      auto kj = torch::arange(S, torch::kLong).unsqueeze(0);
      scores.masked_fill_(kj > qi, -std::numeric_limits<float>::infinity());
    }
    const auto softmax_dtype = torch::promote_types(q.scalar_type(), torch::kFloat32);
    out = torch::matmul(torch::softmax(scores, -1, softmax_dtype).to(q.scalar_type()), v);
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
                                        const torch::Tensor& sin, KVCache* cache, int64_t layer) {
  auto h = x + self_attn->forward(input_layernorm->forward(x), cos, sin, cache, layer);
  return h + mlp->forward(post_attention_layernorm->forward(h));
}

// ---------------------------------------------------------------------------------------------
// Activation checkpointing: a reentrant autograd function that runs a decoder layer without
// recording a graph and replays it (same RNG state, so dropout matches) during backward.

namespace {

struct LayerCheckpoint : public torch::autograd::Function<LayerCheckpoint> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& cos, const torch::Tensor& sin,
                               int64_t layer_handle) {
    auto* layer = reinterpret_cast<DecoderLayerImpl*>(layer_handle);
    ctx->saved_data["layer"] = layer_handle;
    {
      auto gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      ctx->saved_data["rng"] = gen.get_state();
    }
    ctx->save_for_backward({x, cos, sin});
    torch::NoGradGuard no_grad;
    return layer->forward(x, cos, sin, nullptr, 0);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto* layer = reinterpret_cast<DecoderLayerImpl*>(ctx->saved_data["layer"].toInt());
    auto saved = ctx->get_saved_variables();
    auto x = saved[0].detach().requires_grad_(true);
    torch::Tensor rng_now;
    auto gen = at::detail::getDefaultCPUGenerator();
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      rng_now = gen.get_state();
      gen.set_state(ctx->saved_data["rng"].toTensor());
    }
    torch::Tensor y;
    {
      torch::AutoGradMode enable(true);
      y = layer->forward(x, saved[1], saved[2], nullptr, 0);
    }
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(rng_now);
    }
    torch::autograd::backward({y}, {grad_out[0]});
    return {x.grad(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// The model and its builder

namespace {

std::string layer_prefix(int64_t i) { return "model.layers." + std::to_string(i) + "."; }

}  // namespace

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const ModelConfig& config, const WeightSource& weights,
                                           const TuningSpec& spec)
    : config_(config), spec_(spec) {
  config_.validate(weights.describe());
  const bool full = spec.train_type == TrainType::kFull;
  const bool qlora = spec.train_type == TrainType::kQlora;
  QTUNE_CHECK(!qlora || spec.quant, "train_type qlora needs a quantization backend (--quant)");
  QTUNE_CHECK(full || spec.adapter, "train_type ", to_string(spec.train_type),
              " needs an adapter (--adapter)");
  // Frozen dense tensors live in the compute dtype; trainable ones are fp32 masters.
  const auto frozen_dtype = spec.dtype;
  const auto dense_dtype = full ? master_dtype() : frozen_dtype;

  auto expect_shape = [&](const std::string& name, std::vector<int64_t> shape) {
    QTUNE_CHECK(weights.has(name) || weights.has_quantized(name), weights.describe(),
                ": missing tensor ", name);
    if (weights.has_quantized(name)) return;
    auto got = weights.shape(name);
    QTUNE_CHECK(got == shape, weights.describe(), ": tensor ", name, " has shape ",
                c10::IntArrayRef(got), ", expected ", c10::IntArrayRef(shape), " from config");
  };

  // A packed state stored with the weights (a qtune-quantize directory) is loaded as is;
  // otherwise the full-precision `source` tensor is quantized now and dropped.
  auto load_or_quantize = [&](const std::string& name,
                              const std::string& source) -> std::shared_ptr<QuantizedWeight> {
    if (weights.has_quantized(name)) {
      TensorState st = weights.quantized(name);
      const std::string backend = st.meta.value("backend", "");
      QTUNE_CHECK(backend == spec.quant->name(), weights.describe(), ": ", name,
                  " was quantized with '", backend, "' but quant.name is '", spec.quant->name(),
                  "'");
      return spec.quant->load(st);
    }
    auto q = spec.quant->quantize(weights.get(source, torch::kFloat32), spec.quant_options);
    return_freed_heap();
    return q;
  };

  // A pre-quantized directory is used as it was quantized: what it stores dense stays dense
  // (bitsandbytes' llm_int8_skip_modules, a skipped head).
  bool prequantized = false;
  if (qlora)
    for (const auto& n : weights.names())
      if (weights.has_quantized(n)) {
        prequantized = true;
        break;
      }
  auto keep_dense = [&](const std::string& path) {
    return module_matches(path, spec.quant_skip_modules) ||
           (prequantized && !weights.has_quantized(path + ".weight"));
  };

  // Builds one projection slot: the heart of "QLoRA = LoRA with a quantized base".
  auto make_slot = [&](const std::string& path, const std::string& short_name, int64_t out,
                       int64_t in, bool quantize) -> LinearSlot {
    const std::string name = path + ".weight";
    quantize = quantize && !keep_dense(path);
    expect_shape(name, {out, in});
    LinearSlot slot{nullptr};
    if (quantize) {
      auto q = load_or_quantize(name, name);
      QTUNE_CHECK(q->out_features() == out && q->in_features() == in, name,
                  ": quantized shape mismatch");
      slot = LinearSlot(std::move(q));
    } else {
      if (weights.has_quantized(name) && !weights.has(name))
        throw UserError(weights.describe() + ": " + name + " is only stored quantized; " +
                        (qlora ? "quant.skip_modules cannot keep it dense"
                               : "use --train_type qlora with its backend"));
      slot = LinearSlot(weights.get(name, dense_dtype), /*trainable=*/full);
    }
    if (config.has_bias(short_name)) {
      // Biases stay dense: trained under full, frozen beside any (quantized) base otherwise.
      expect_shape(path + ".bias", {out});
      slot->set_bias(weights.get(path + ".bias", dense_dtype), full);
    }
    if (!full && spec.target_modules.count(short_name))
      slot->attach_adapter(spec.adapter->create(in, out, spec.adapter_options));
    slots_.emplace_back(path, slot);
    return slot;
  };

  const int64_t dim = config.hidden_size, hd = config.head_dim();
  const int64_t q_out = config.num_attention_heads * hd, kv_out = config.num_key_value_heads * hd;
  model = register_module("model", LlamaBackbone());
  expect_shape("model.embed_tokens.weight", {config.vocab_size, dim});
  model->embed_tokens = model->register_module(
      "embed_tokens", Embedding(weights.get("model.embed_tokens.weight", dense_dtype), full));
  model->layers = model->register_module("layers", torch::nn::ModuleList());
  auto norm_weight = [&](const std::string& name) {
    expect_shape(name, {dim});
    return weights.get(name, master_dtype());
  };
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    const std::string p = layer_prefix(i);
    // One statement per slot: argument evaluation order is unspecified, and slots must be
    // built (and listed) in model order.
    auto in_norm = RMSNorm(norm_weight(p + "input_layernorm.weight"), config.rms_norm_eps, full);
    auto q = make_slot(p + "self_attn.q_proj", "q", q_out, dim, qlora);
    auto k = make_slot(p + "self_attn.k_proj", "k", kv_out, dim, qlora);
    auto v = make_slot(p + "self_attn.v_proj", "v", kv_out, dim, qlora);
    auto o = make_slot(p + "self_attn.o_proj", "o", dim, q_out, qlora);
    auto post_norm =
        RMSNorm(norm_weight(p + "post_attention_layernorm.weight"), config.rms_norm_eps, full);
    auto gate = make_slot(p + "mlp.gate_proj", "gate", config.intermediate_size, dim, qlora);
    auto up = make_slot(p + "mlp.up_proj", "up", config.intermediate_size, dim, qlora);
    auto down = make_slot(p + "mlp.down_proj", "down", dim, config.intermediate_size, qlora);
    auto attn = Attention(config, q, k, v, o);
    attn->set_window(config.attention_window(i));
    model->layers->push_back(DecoderLayer(in_norm, attn, post_norm, Mlp(gate, up, down)));
    spdlog::debug("built layer {}/{}", i + 1, config.num_hidden_layers);
  }
  model->norm = model->register_module(
      "norm", RMSNorm(norm_weight("model.norm.weight"), config.rms_norm_eps, full));

  const bool quantize_head = qlora && !spec.quant_skip_output && !keep_dense("lm_head");
  if (config.tie_word_embeddings && !quantize_head) {
    // The head is the embedding matrix itself (trained through it under full).
    lm_head = LinearSlot(model->embed_tokens->weight, full, /*shared=*/true);
    if (!full && spec.target_modules.count("output"))
      lm_head->attach_adapter(spec.adapter->create(dim, config.vocab_size, spec.adapter_options));
    slots_.emplace_back("lm_head", lm_head);
  } else if (config.tie_word_embeddings) {
    // A quantized copy of the tied matrix: the embedding lookup keeps the dense one.
    lm_head = LinearSlot(load_or_quantize("lm_head.weight", "model.embed_tokens.weight"));
    if (spec.target_modules.count("output"))
      lm_head->attach_adapter(spec.adapter->create(dim, config.vocab_size, spec.adapter_options));
    slots_.emplace_back("lm_head", lm_head);
  } else {
    lm_head = make_slot("lm_head", "output", config.vocab_size, dim, quantize_head);
  }
  register_module("lm_head", lm_head);

  inv_freq_ = rope_inv_freq(config, config.max_position_embeddings);
}

std::pair<torch::Tensor, torch::Tensor> LlamaForCausalLMImpl::rope(int64_t start, int64_t length,
                                                                   torch::ScalarType dtype) const {
  auto pos = torch::arange(start, start + length, torch::kFloat64);
  auto freqs = torch::outer(pos, rope_depends_on_length(config_)
                                     ? rope_inv_freq(config_, start + length)
                                     : inv_freq_);
  auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

torch::Tensor LlamaForCausalLMImpl::forward(const torch::Tensor& tokens, KVCache* cache) {
  QTUNE_CHECK(tokens.dim() == 2, "tokens must be [batch, time], got ", tokens.sizes());
  const int64_t start = cache ? cache->length : 0;
  auto [cos, sin] = rope(start, tokens.size(1), spec_.dtype);
  auto h = model->embed_tokens->forward(tokens).to(spec_.dtype);
  for (size_t i = 0; i < model->layers->size(); ++i) {
    auto layer = model->layers->ptr<DecoderLayerImpl>(i);
    if (checkpointing_ && cache == nullptr && torch::GradMode::is_enabled()) {
      h = LayerCheckpoint::apply(h, cos, sin, reinterpret_cast<int64_t>(layer.get()));
    } else {
      h = layer->forward(h, cos, sin, cache, static_cast<int64_t>(i));
    }
  }
  if (cache) cache->length += tokens.size(1);
  h = model->norm->forward(h);
  return lm_head->forward(h).to(master_dtype());
}

std::pair<torch::Tensor, int64_t> LlamaForCausalLMImpl::loss(const torch::Tensor& tokens,
                                                             const torch::Tensor& targets) {
  auto logits = forward(tokens);
  auto flat_targets = targets.reshape({-1});
  const int64_t count = flat_targets.ne(-100).sum().item<int64_t>();
  auto l = F::cross_entropy(logits.view({-1, logits.size(-1)}), flat_targets,
                            F::CrossEntropyFuncOptions().ignore_index(-100));
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
