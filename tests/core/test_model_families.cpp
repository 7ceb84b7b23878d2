// Model families from HF config.json: Llama 3.x (rope scaling, explicit head_dim, large tied or
// untied vocabularies), Mistral (sliding window) and Qwen2 (q/k/v biases). Each family-specific
// part is shown to change the numbers where, and only where, it should; parity with transformers'
// own classes is in tests/oracle.
#include <gtest/gtest.h>

#include <fstream>

#include "qtune/error.h"
#include "qtune/model.h"
#include "qtune/model_files.h"
#include "qtune/registry.h"
#include "qtune/rope.h"
#include "test_util.h"

using namespace qtune;

namespace {

using qtune::test::plugins;
using qtune::test::tiny_config;

// Every tensor of a model in memory, editable: the tests change one family-specific tensor and
// keep the rest.
class TensorMap : public WeightSource {
 public:
  TensorMap(const ModelConfig& c, const WeightSource& from) {
    for (const auto& [name, _] : llama_weight_shapes(c)) t_[name] = from.get(name, torch::kFloat32);
  }
  TensorMap(const TensorMap& o) : WeightSource() {  // a deep copy: edits stay local
    for (const auto& [k, v] : o.t_) t_[k] = v.clone();
  }
  std::string describe() const override { return "tensor map"; }
  bool has(const std::string& n) const override { return t_.count(n) > 0; }
  std::vector<int64_t> shape(const std::string& n) const override { return t_.at(n).sizes().vec(); }
  torch::Tensor get(const std::string& n, torch::ScalarType dtype) const override {
    QTUNE_CHECK(has(n), "tensor map: no tensor ", n);
    return t_.at(n).to(dtype).clone();
  }
  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    for (const auto& [k, _] : t_) out.push_back(k);
    return out;
  }
  std::map<std::string, torch::Tensor> t_;
};

// Random weights (std 0.02) give near-uniform attention, under which position and bias effects
// barely reach the logits; q, k and v (weights and biases) times 10 make attention sharp.
void sharpen_attention(TensorMap& w) {
  for (auto& [name, t] : w.t_)
    for (const char* proj : {"q_proj", "k_proj", "v_proj"})
      if (name.find(proj) != std::string::npos) t.mul_(10);
}

TuningSpec adapter_spec(TrainType type) {
  return TuningSpec::for_training(type, torch::kFloat32, plugins(), "nf4",
                                  Json{{"block_size", 32}}, false, "lora", Json{{"rank", 4}},
                                  {"all-linear"});
}

torch::Tensor logits(const ModelConfig& c, const WeightSource& w, const torch::Tensor& tokens,
                     const TuningSpec& spec = TuningSpec()) {
  LlamaForCausalLM m(c, w, spec);
  torch::NoGradGuard no_grad;
  return m->forward(tokens);
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

Json llama32_config() {
  // The shape of Llama-3.2-1B's config.json, scaled down.
  return Json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 16, "intermediate_size": 40, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": true, "attention_bias": false,
    "attention_dropout": 0.0, "mlp_bias": false, "pretraining_tp": 1,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0", "use_cache": true})");
}

Json qwen25_config() {
  return Json::parse(R"({
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 16, "intermediate_size": 40, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "max_window_layers": 21, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": false,
    "tie_word_embeddings": true, "bos_token_id": 151643, "eos_token_id": 151645,
    "attention_dropout": 0.0, "rope_scaling": null, "torch_dtype": "bfloat16"})");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// config.json

TEST(Families, ConfigsParseAsTransformersWritesThem) {
  const ModelConfig l = ModelConfig::from_hf_json(llama32_config(), "llama.json");
  EXPECT_EQ(l.model_type, "llama");
  EXPECT_EQ(l.head_dim(), 8);  // explicit, not 16 / 4
  EXPECT_EQ(l.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(l.rope_scaling.factor, 32.0);
  EXPECT_EQ(l.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(l.bos_token_id, 128000);
  EXPECT_EQ(l.eos_token_id, 128001);  // the first of the list
  EXPECT_FALSE(l.qkv_bias);

  const ModelConfig q = ModelConfig::from_hf_json(qwen25_config(), "qwen.json");
  EXPECT_TRUE(q.qkv_bias && q.has_bias("q") && q.has_bias("k") && q.has_bias("v"));
  EXPECT_FALSE(q.has_bias("o") || q.has_bias("gate") || q.has_bias("output"));
  EXPECT_EQ(q.sliding_window, 0);  // use_sliding_window false
  Json qs = qwen25_config();
  qs.merge_patch({{"use_sliding_window", true}, {"sliding_window", 5}, {"max_window_layers", 1}});
  const ModelConfig qw = ModelConfig::from_hf_json(qs, "qwen.json");
  EXPECT_EQ(qw.attention_window(0), 0);
  EXPECT_EQ(qw.attention_window(1), 5);
  qs["layer_types"] = Json::array({"sliding_attention", "full_attention"});
  const ModelConfig qt = ModelConfig::from_hf_json(qs, "qwen.json");
  EXPECT_EQ(qt.attention_window(0), 5);  // layer_types wins over max_window_layers
  EXPECT_EQ(qt.attention_window(1), 0);
  Json qn = qwen25_config();
  qn.erase("bos_token_id");
  EXPECT_EQ(ModelConfig::from_hf_json(qn, "q").bos_token_id, -1);  // Qwen2Config has none

  Json m = {{"model_type", "mistral"}, {"hidden_size", 16},        {"intermediate_size", 40},
            {"num_hidden_layers", 2},  {"num_attention_heads", 4}, {"vocab_size", 32}};
  EXPECT_EQ(ModelConfig::from_hf_json(m, "m").sliding_window, 4096);  // MistralConfig default
  m["sliding_window"] = nullptr;
  EXPECT_EQ(ModelConfig::from_hf_json(m, "m").sliding_window, 0);
  m["sliding_window"] = 3;
  const ModelConfig mc = ModelConfig::from_hf_json(m, "m");
  EXPECT_EQ(mc.attention_window(0), 3);
  EXPECT_EQ(mc.attention_window(1), 3);
  EXPECT_EQ(mc.max_position_embeddings, 131072);

  // transformers 5 moved rope_theta and the scaling into rope_parameters.
  Json v5 = llama32_config();
  v5.erase("rope_scaling");
  v5.erase("rope_theta");
  v5["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 4.0}, {"rope_theta", 123.0}};
  const ModelConfig l5 = ModelConfig::from_hf_json(v5, "v5");
  EXPECT_EQ(l5.rope_scaling.type, "linear");
  EXPECT_DOUBLE_EQ(l5.rope_theta, 123.0);

  // What we write reads back as the same architecture.
  for (const ModelConfig& c : {l, q, qw, qt, mc, l5}) {
    const Json j = c.to_hf_json();
    EXPECT_EQ(ModelConfig::from_hf_json(j, "x").to_hf_json(), j) << j.dump();
  }
  EXPECT_EQ(q.to_hf_json()["architectures"][0], "Qwen2ForCausalLM");
  EXPECT_EQ(mc.to_hf_json()["sliding_window"], 3);
}

TEST(Families, UnsupportedOptionsAreRefusedByName) {
  auto err = [](Json base, const Json& patch) {
    base.merge_patch(patch);
    return test::user_error_of([&] { ModelConfig::from_hf_json(base, "cfg.json"); });
  };
  const Json l = llama32_config();
  auto rope = [&](const Json& r) {
    Json j = l;
    j["rope_scaling"] = r;  // replaced, not merged into the llama3 object
    return test::user_error_of([&] { ModelConfig::from_hf_json(j, "cfg.json"); });
  };
  test::expect_contains(err(l, {{"model_type", "qwen3"}}),
                        "cfg.json: model_type \"qwen3\" is not supported");
  test::expect_contains(rope({{"rope_type", "yarn"}, {"factor", 4.0}}),
                        "cfg.json: rope_scaling.rope_type \"yarn\" is not supported");
  test::expect_contains(rope({{"type", "linear"}, {"factor", 2.0}, {"beta_fast", 32}}),
                        "rope_scaling.beta_fast = 32 is not supported for rope_type \"linear\"");
  test::expect_contains(rope({{"rope_type", "llama3"},
                              {"factor", 8.0},
                              {"high_freq_factor", 4.0},
                              {"original_max_position_embeddings", 8192}}),
                        "rope_type \"llama3\" needs \"low_freq_factor\"");
  test::expect_contains(rope({{"rope_type", "linear"}}), "rope_type \"linear\" needs \"factor\"");
  test::expect_contains(rope({{"rope_type", "dynamic"}, {"factor", -1.0}}),
                        "rope_scaling.factor must be > 0");
  test::expect_contains(rope({{"rope_type", "llama3"},
                              {"factor", 8.0},
                              {"low_freq_factor", 4.0},
                              {"high_freq_factor", 4.0},
                              {"original_max_position_embeddings", 8192}}),
                        "low_freq_factor < high_freq_factor");
  test::expect_contains(err(l, {{"partial_rotary_factor", 0.5}}),
                        "\"partial_rotary_factor\" = 0.5");
  test::expect_contains(err(l, {{"attention_dropout", 0.1}}),
                        "\"attention_dropout\" = 0.1 is not supported");
  test::expect_contains(err(l, {{"hidden_act", "gelu"}}),
                        "\"hidden_act\" = \"gelu\" is not supported");
  test::expect_contains(err(l, {{"sliding_window", 16}}),
                        "\"sliding_window\" = 16 is not supported for model_type \"llama\"");
  test::expect_contains(err(l, {{"head_dim", 7}}), "head dimension 7 must be even");
  test::expect_contains(
      err(l, {{"layer_types", Json::array({"full_attention", "chunked_attention"})}}),
      "layer_types entry \"chunked_attention\" is not supported");
  test::expect_contains(
      err(qwen25_config(), {{"layer_types", Json::array({"full_attention", "sliding_attention"})}}),
      "sliding_attention layers but no sliding window is set");
  test::expect_contains(err(l, {{"layer_types", Json::array({"full_attention"})}}),
                        "layer_types must have one entry per layer (2), got 1");
}

// Sizes no real model has are refused by name and limit before anything is sized from them (a
// Qwen2 config sizes its per-layer sliding flags from num_hidden_layers while it is parsed).
TEST(Families, SizesAboveTheLimitsAreRefusedBeforeAllocating) {
  auto err = [](Json base, const Json& patch) {
    base.merge_patch(patch);
    return test::user_error_of([&] { ModelConfig::from_hf_json(base, "cfg.json"); });
  };
  const int64_t huge = int64_t{1} << 62;
  Json qs = qwen25_config();
  qs["use_sliding_window"] = true;
  test::expect_contains(err(qs, {{"num_hidden_layers", huge}}),
                        "cfg.json: num_hidden_layers = 4611686018427387904 is above the limit 4096");
  const Json l = llama32_config();
  test::expect_contains(err(l, {{"hidden_size", huge}}),
                        "cfg.json: hidden_size = 4611686018427387904 is above the limit 131072");
  test::expect_contains(err(l, {{"vocab_size", int64_t{1} << 25}}),
                        "cfg.json: vocab_size = 33554432 is above the limit 16777216");
  test::expect_contains(err(l, {{"intermediate_size", int64_t{1} << 21}}),
                        "intermediate_size = 2097152 is above the limit 1048576");
}

// ---------------------------------------------------------------------------------------------
// Rotary scaling

TEST(Rope, ScalingTypesMoveTheFrequenciesTheirWay) {
  ModelConfig c = ModelConfig::from_hf_json(llama32_config(), "x");
  c.head_size = 128;  // Llama 3's real head size and frequencies
  c.hidden_size = 512;
  ModelConfig plain = c;
  plain.rope_scaling = RopeScaling();
  const auto base = rope_inv_freq(plain, 16);
  ASSERT_EQ(base.size(0), 64);
  EXPECT_DOUBLE_EQ(base[0].item<double>(), 1.0);
  EXPECT_NEAR(base[1].item<double>(), std::pow(500000.0, -2.0 / 128), 1e-15);

  // llama3: short wavelengths kept, long ones / factor, a smooth band between.
  const auto l3 = rope_inv_freq(c, 16);
  const auto wavelen = 2 * M_PI / base;
  int kept = 0, divided = 0, between = 0;
  for (int64_t i = 0; i < 64; ++i) {
    const double b = base[i].item<double>(), v = l3[i].item<double>(),
                 w = wavelen[i].item<double>();
    if (w < 8192.0 / 4) {
      EXPECT_DOUBLE_EQ(v, b) << i;
      ++kept;
    } else if (w > 8192.0 / 1) {
      EXPECT_DOUBLE_EQ(v, b / 32.0) << i;
      ++divided;
    } else {
      EXPECT_LT(v, b) << i;
      EXPECT_GT(v, b / 32.0) << i;
      ++between;
    }
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(between, 0);

  ModelConfig lin = plain;
  lin.rope_scaling.type = "linear";
  lin.rope_scaling.factor = 4.0;
  EXPECT_TRUE(torch::equal(rope_inv_freq(lin, 16), base / 4.0));

  // dynamic NTK: nothing changes within the trained context; beyond it the base grows.
  ModelConfig dyn = plain;
  dyn.rope_scaling.type = "dynamic";
  dyn.rope_scaling.factor = 2.0;
  dyn.max_position_embeddings = 64;
  EXPECT_FALSE(rope_depends_on_length(plain));
  EXPECT_TRUE(rope_depends_on_length(dyn));
  EXPECT_TRUE(torch::equal(rope_inv_freq(dyn, 64), rope_inv_freq(plain, 64)));
  const auto longer = rope_inv_freq(dyn, 128);
  EXPECT_DOUBLE_EQ(longer[0].item<double>(), 1.0);
  EXPECT_TRUE(longer.narrow(0, 1, 63).lt(base.narrow(0, 1, 63)).all().item<bool>());
}

TEST(Families, RopeScalingChangesLogitsAfterPositionZeroOnly) {
  // head_dim 4: frequencies 1 and 0.01 (wavelengths 6.3 and 628). With an original context of
  // 64 the first is kept and the second divided by the factor.
  ModelConfig c = tiny_config();
  TensorMap w(c, *random_weights(c, 31));
  sharpen_attention(w);
  auto tokens = torch::randint(0, c.vocab_size, {1, 20}, torch::kLong);
  const auto plain = logits(c, w, tokens);
  for (const std::string type : {"linear", "dynamic", "llama3"}) {
    ModelConfig s = c;
    s.rope_scaling.type = type;
    s.rope_scaling.factor = 8.0;
    s.rope_scaling.original_max_position_embeddings = 64;
    s.max_position_embeddings = type == "dynamic" ? 8 : 64;  // dynamic acts beyond it
    const auto scaled = logits(s, w, tokens);
    // Position 0 is not rotated at all; every later one is, differently.
    EXPECT_EQ(max_diff(scaled.narrow(1, 0, 1), plain.narrow(1, 0, 1)), 0.0) << type;
    EXPECT_GT(max_diff(scaled.narrow(1, 10, 10), plain.narrow(1, 10, 10)), 1e-4) << type;

    // Read back from an HF directory, the scaling is still there.
    const std::string dir = test::temp_dir("rope");
    save_hf_model(dir, s, w, torch::kFloat32);
    ModelFiles f = open_model(dir);
    EXPECT_EQ(f.config.rope_scaling.type, type);
    EXPECT_TRUE(torch::equal(logits(f.config, *f.weights, tokens), scaled)) << type;
  }
}

// ---------------------------------------------------------------------------------------------
// Explicit head_dim and large vocabularies

TEST(Families, ExplicitHeadDimShapesTheProjections) {
  ModelConfig c = tiny_config();
  c.head_size = 8;  // 4 heads x 8 = 32 != hidden 16
  auto shapes = llama_weight_shapes(c);
  std::map<std::string, std::vector<int64_t>> by_name(shapes.begin(), shapes.end());
  EXPECT_EQ(by_name["model.layers.0.self_attn.q_proj.weight"], (std::vector<int64_t>{32, 16}));
  EXPECT_EQ(by_name["model.layers.0.self_attn.k_proj.weight"], (std::vector<int64_t>{16, 16}));
  EXPECT_EQ(by_name["model.layers.0.self_attn.o_proj.weight"], (std::vector<int64_t>{16, 32}));
  int64_t n = 0;
  for (const auto& [_, s] : shapes) {
    int64_t e = 1;
    for (auto d : s) e *= d;
    n += e;
  }
  EXPECT_EQ(c.num_parameters(), n);

  auto w = random_weights(c, 4);
  const std::string dir = test::temp_dir("headdim");
  save_hf_model(dir, c, *w, torch::kFloat32);
  ModelFiles f = open_model(dir);
  EXPECT_EQ(f.config.head_dim(), 8);
  LlamaForCausalLM m(f.config, *f.weights, TuningSpec());
  torch::NoGradGuard no_grad;
  auto tokens = torch::randint(0, c.vocab_size, {2, 9}, torch::kLong);
  auto full = m->forward(tokens);
  auto cache = m->new_cache(2, 9);
  auto a = m->forward(tokens.narrow(1, 0, 4), &cache);
  auto b = m->forward(tokens.narrow(1, 4, 5), &cache);
  EXPECT_LT(max_diff(full, torch::cat({a, b}, 1)), 1e-5);
}

TEST(Families, LargeVocabulariesTiedAndUntied) {
  for (bool tied : {true, false}) {
    ModelConfig c = ModelConfig::from_hf_json(llama32_config(), "x");
    c.tie_word_embeddings = tied;
    c.num_hidden_layers = 1;
    auto w = random_weights(c, 9);
    const std::string dir = test::temp_dir("vocab");
    save_hf_model(dir, c, *w, torch::kBFloat16);
    ModelFiles f = open_model(dir);
    EXPECT_EQ(f.weights->has("lm_head.weight"), !tied);
    LlamaForCausalLM m(f.config, *f.weights, adapter_spec(TrainType::kLora));
    torch::NoGradGuard no_grad;
    auto tokens = torch::tensor({{128000, 5, 151935 % 128256, 128255}}, torch::kLong);
    auto y = m->forward(tokens);
    EXPECT_EQ(y.sizes(), (std::vector<int64_t>{1, 4, 128256}));
    EXPECT_TRUE(torch::isfinite(y).all().item<bool>());
    if (tied)  // the head is the embedding matrix, held once
      EXPECT_EQ(m->lm_head->dense().data_ptr(), m->model->embed_tokens->weight.data_ptr());
  }
}

// ---------------------------------------------------------------------------------------------
// Mistral's sliding window

TEST(Families, SlidingWindowMasksKeysBeyondIt) {
  ModelConfig c = tiny_config();
  c.num_hidden_layers = 1;
  c.model_type = "mistral";
  auto w = random_weights(c, 12);
  auto tokens = torch::randint(0, c.vocab_size, {2, 10}, torch::kLong);
  const auto full = logits(c, *w, tokens);
  ModelConfig s = c;
  s.sliding_window = 4;
  const auto windowed = logits(s, *w, tokens);
  // Within the window nothing changes (up to fp32 rounding: on LibTorch 2.x the plain causal
  // mask runs in its scaled_dot_product_attention, the window in core's tiled kernel); past it,
  // the far keys are gone.
  EXPECT_LT(max_diff(windowed.narrow(1, 0, 4), full.narrow(1, 0, 4)), 1e-6);
  EXPECT_GT(max_diff(windowed.narrow(1, 4, 6), full.narrow(1, 4, 6)), 1e-4);
  // One layer and relative positions: the last query sees exactly the last 4 tokens.
  const auto last4 = logits(c, *w, tokens.narrow(1, 6, 4));
  EXPECT_LT(max_diff(windowed.narrow(1, 9, 1), last4.narrow(1, 3, 1)), 1e-5);

  // Decoding with a cache applies the same window.
  LlamaForCausalLM m(s, *w, TuningSpec());
  torch::NoGradGuard no_grad;
  auto cache = m->new_cache(2, 10);
  std::vector<torch::Tensor> parts{m->forward(tokens.narrow(1, 0, 3), &cache)};
  for (int64_t t = 3; t < 10; ++t) parts.push_back(m->forward(tokens.narrow(1, t, 1), &cache));
  EXPECT_LT(max_diff(torch::cat(parts, 1), windowed), 1e-5);

  // Qwen2 with max_window_layers 1: layer 0 full, layer 1 windowed.
  ModelConfig q = tiny_config();
  q.model_type = "qwen2";
  q.qkv_bias = true;
  q.sliding_window = 4;
  q.sliding_layers = {false, true};
  auto qw = random_weights(q, 13);
  ModelConfig qfull = q;
  qfull.sliding_window = 0;
  qfull.sliding_layers.clear();
  ModelConfig qall = q;
  qall.sliding_layers.clear();
  const auto a = logits(q, *qw, tokens), b = logits(qfull, *qw, tokens),
             d = logits(qall, *qw, tokens);
  EXPECT_GT(max_diff(a, b), 1e-4);
  EXPECT_GT(max_diff(a, d), 1e-4);
}

// ---------------------------------------------------------------------------------------------
// Qwen2's q/k/v biases

TEST(Families, Qwen2BiasesAreLoadedAndAddedBeforeAttention) {
  ModelConfig q = tiny_config();
  q.model_type = "qwen2";
  q.qkv_bias = true;
  TensorMap w(q, *random_weights(q, 41));
  sharpen_attention(w);
  const std::string p = "model.layers.0.self_attn.";
  const std::string dir = test::temp_dir("qwen2");
  save_hf_model(dir, q, w, torch::kFloat32);
  ModelFiles f = open_model(dir);
  EXPECT_EQ(f.config.model_type, "qwen2");
  EXPECT_EQ(f.weights->shape(p + "k_proj.bias"), (std::vector<int64_t>{8}));
  EXPECT_FALSE(f.weights->has(p + "o_proj.bias"));
  auto tokens = torch::randint(0, q.vocab_size, {2, 8}, torch::kLong);
  const auto with_bias = logits(f.config, *f.weights, tokens);
  EXPECT_TRUE(torch::equal(with_bias, logits(q, w, tokens)));

  // Each bias matters where it can: dropping the q or v bias changes the logits.
  for (const char* proj : {"q_proj", "v_proj"}) {
    TensorMap z = w;
    for (int l = 0; l < 2; ++l)
      z.t_["model.layers." + std::to_string(l) + ".self_attn." + proj + ".bias"].zero_();
    EXPECT_GT(max_diff(logits(q, z, tokens), with_bias), 1e-3) << proj;
  }

  // An exact identity ties the v bias to its place in attention: a v bias b passes through
  // attention unchanged (the weights of each query sum to 1), so it equals an o_proj bias W_o b.
  // The Qwen2 model therefore equals a Llama attention_bias model with the same q/k biases, no v
  // bias and that o bias.
  TensorMap llama_w = w;
  ModelConfig llama = q;
  llama.model_type = "llama";
  llama.o_bias = true;
  for (int l = 0; l < 2; ++l) {
    const std::string pl = "model.layers." + std::to_string(l) + ".self_attn.";
    // each kv head serves heads / kv_heads consecutive query heads
    auto bv = w.t_[pl + "v_proj.bias"].view({q.num_key_value_heads, 1, q.head_dim()});
    auto bv_heads = bv.expand({q.num_key_value_heads, q.num_attention_heads / q.num_key_value_heads,
                               q.head_dim()})
                        .reshape({-1});
    llama_w.t_[pl + "v_proj.bias"].zero_();
    llama_w.t_[pl + "o_proj.bias"] = torch::mv(w.t_[pl + "o_proj.weight"], bv_heads);
  }
  EXPECT_LT(max_diff(with_bias, logits(llama, llama_w, tokens)), 1e-5);
}

TEST(Families, Qwen2BiasIsTrainedUnderFullAndFrozenBesideAdapters) {
  ModelConfig q = tiny_config();
  q.model_type = "qwen2";
  q.qkv_bias = true;
  auto w = random_weights(q, 43);
  auto tokens = torch::randint(0, q.vocab_size, {2, 8}, torch::kLong);
  const std::string bias = "model.layers.1.self_attn.v_proj.bias";

  LlamaForCausalLM full(q, *w, TuningSpec());
  full->loss(tokens, tokens).first.backward();
  std::map<std::string, torch::Tensor> trainable;
  for (const auto& [name, t] : full->trainable_parameters()) trainable[name] = t;
  ASSERT_TRUE(trainable.count(bias));
  EXPECT_GT(trainable[bias].grad().abs().sum().item<double>(), 0.0);
  EXPECT_EQ(full->num_trainable_parameters(), q.num_parameters());

  for (TrainType type : {TrainType::kLora, TrainType::kQlora}) {
    const TuningSpec spec = adapter_spec(type);
    LlamaForCausalLM m(q, *w, spec);
    for (const auto& [name, _] : m->trainable_parameters())
      EXPECT_NE(name.find(".adapter."), std::string::npos) << name;
    auto slot = m->slots()[2].second;  // layer 0 v_proj
    ASSERT_EQ(m->slots()[2].first, "model.layers.0.self_attn.v_proj");
    ASSERT_TRUE(slot->bias().defined());
    EXPECT_FALSE(slot->bias().requires_grad());
    EXPECT_TRUE(torch::equal(slot->bias(),
                             w->get("model.layers.0.self_attn.v_proj.bias", torch::kFloat32)));
    // The slot computes base(x) + adapter(x) + bias, and a quantized base is the weight alone
    // quantized: the bias never enters the packed bytes.
    torch::NoGradGuard no_grad;
    auto x = torch::randn({3, q.hidden_size});
    torch::Tensor base;
    if (type == TrainType::kQlora) {
      auto alone = spec.base.quant->quantize(
          w->get("model.layers.0.self_attn.v_proj.weight", torch::kFloat32),
          spec.base.quant_options);
      EXPECT_TRUE(torch::equal(alone->state().tensors.at("weight"),
                               slot->quantized()->state().tensors.at("weight")));
      base = slot->quantized()->linear(x);
    } else {
      base = torch::matmul(x, slot->dense().t());
    }
    EXPECT_LT(max_diff(slot->forward(x), base + slot->bias()), 1e-6);
  }
}
