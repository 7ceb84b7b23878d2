// Model files: the llama2.c loader on stories260K.bin (shapes, tying, rotary permutation, size
// validation), HF directories (single, sharded, config.json errors), and qtune-convert.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "qtune/error.h"
#include "qtune/llama2c.h"
#include "qtune/model_files.h"
#include "qtune/safetensors.h"
#include "qtune/weight_source.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace qtune {
namespace {

using qtune::test::error_of;

// ---- llama2.c ------------------------------------------------------------------------------

TEST(Llama2c, Stories260KShapesAndConfig) {
  auto m = open_model(test::data_path("stories260K.bin"));
  const ModelConfig& c = m.config;
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 172);
  EXPECT_EQ(c.num_hidden_layers, 5);
  EXPECT_EQ(c.num_attention_heads, 8);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.max_position_embeddings, 512);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  // tok512.bin sits beside the checkpoint: llama2.c's tok{vocab}.bin convention.
  EXPECT_EQ(fs::path(m.tokenizer_path).filename(), "tok512.bin");

  const WeightSource& w = *m.weights;
  EXPECT_FALSE(w.has("lm_head.weight"));  // shared classifier
  auto expected = llama_weight_shapes(c);
  EXPECT_EQ(w.names().size(), expected.size());
  EXPECT_EQ(expected.size(), 1u + 5 * 9 + 1);
  for (const auto& [name, shape] : expected) {
    ASSERT_TRUE(w.has(name)) << name;
    EXPECT_EQ(w.shape(name), shape) << name;
    auto t = w.get(name, torch::kFloat32);
    EXPECT_EQ(t.sizes().vec(), shape) << name;
    EXPECT_TRUE(t.is_contiguous());
    EXPECT_TRUE(torch::isfinite(t).all().item<bool>()) << name;
  }
  EXPECT_EQ(w.shape("model.layers.0.self_attn.k_proj.weight"), (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(w.get("model.norm.weight", torch::kBFloat16).scalar_type(), torch::kBFloat16);
  EXPECT_EQ(c.num_parameters(),
            512 * 64 + 5 * (64 * 64 * 2 + 2 * 32 * 64 + 3 * 64 * 172 + 128) + 64);
  EXPECT_NE(error_of([&] { w.get("lm_head.weight", torch::kFloat32); }).find("lm_head.weight"),
            std::string::npos);
}

TEST(Llama2c, RopePermutationIsTheHfPermutation) {
  auto ck = Llama2cCheckpoint::open(test::data_path("stories260K.bin"));
  for (const char* proj : {"q_proj", "k_proj"}) {
    const std::string name = std::string("model.layers.2.self_attn.") + proj + ".weight";
    const int64_t heads = std::string(proj) == "q_proj" ? 8 : 4;
    torch::Tensor raw = ck->raw(name);
    torch::Tensor hf = ck->get(name, torch::kFloat32);
    // permuted-then-inverse equals raw, bit for bit
    EXPECT_TRUE(torch::equal(rope_half_to_interleaved(hf, heads), raw)) << name;
    // a bijection of rows: every raw row appears exactly once, at the HF position
    // HF row h*hd + half*hd/2 + i  <-  llama2.c row h*hd + 2*i + half
    const int64_t hd = 8;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < hd / 2; ++i)
        for (int64_t half = 0; half < 2; ++half)
          ASSERT_TRUE(torch::equal(hf[h * hd + half * hd / 2 + i], raw[h * hd + 2 * i + half]));
    EXPECT_FALSE(torch::equal(hf, raw));
  }
  // Other projections are not permuted.
  EXPECT_TRUE(torch::equal(ck->get("model.layers.1.self_attn.v_proj.weight", torch::kFloat32),
                           ck->raw("model.layers.1.self_attn.v_proj.weight")));
}

// The permutation is the right one, not just a bijection: llama2.c's RoPE (run.c: pairs
// (2j, 2j+1) of a head rotated by pos * 10000^(-2j/head_size)) on the raw weights and HF's
// rotate_half RoPE (pairs (j, j + head_size/2)) on the permuted weights give the same attention
// score q(m).k(n) for every head and every pair of positions m != n (at m == n any pairing
// would agree: a common rotation preserves dot products).
TEST(Llama2c, RopeOnPermutedWeightsMatchesLlama2c) {
  auto ck = Llama2cCheckpoint::open(test::data_path("stories260K.bin"));
  const int64_t hs = 8, nh = 8, nkv = 4;
  torch::manual_seed(3);
  torch::Tensor x = torch::randn({64}, torch::kFloat64);
  torch::Tensor y = torch::randn({64}, torch::kFloat64);
  auto proj = [&](const std::string& n, const torch::Tensor& in, bool hf) {
    torch::Tensor w = hf ? ck->get(n, torch::kFloat64) : ck->raw(n).to(torch::kFloat64);
    return torch::matmul(w, in);
  };
  auto rope_llama2c = [&](torch::Tensor v, int64_t pos) {
    v = v.clone();
    auto a = v.accessor<double, 1>();
    for (int64_t i = 0; i < v.size(0); i += 2) {
      double freq = 1.0 / std::pow(10000.0, double(i % hs) / hs);
      double c = std::cos(pos * freq), s = std::sin(pos * freq);
      double v0 = a[i], v1 = a[i + 1];
      a[i] = v0 * c - v1 * s;
      a[i + 1] = v0 * s + v1 * c;
    }
    return v.reshape({-1, hs});
  };
  auto rope_hf = [&](torch::Tensor v, int64_t pos) {
    torch::Tensor h = v.reshape({-1, hs});
    torch::Tensor inv = 1.0 / torch::pow(10000.0, torch::arange(0, hs, 2, torch::kFloat64) / hs);
    torch::Tensor ang = torch::cat({inv, inv}) * double(pos);
    torch::Tensor rot = torch::cat({-h.slice(1, hs / 2), h.slice(1, 0, hs / 2)}, 1);
    return h * torch::cos(ang) + rot * torch::sin(ang);
  };
  // grouped-query attention: query head h reads kv head h / (nh / nkv)
  auto scores = [&](const torch::Tensor& q, const torch::Tensor& k) {
    return (q * k.repeat_interleave(nh / nkv, 0)).sum(1);
  };
  const std::string p = "model.layers.1.self_attn.";
  for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{{1, 0}, {7, 3}, {300, 2}, {5, 9}}) {
    torch::Tensor s0 = scores(rope_llama2c(proj(p + "q_proj.weight", x, false), m),
                              rope_llama2c(proj(p + "k_proj.weight", y, false), n));
    torch::Tensor s1 = scores(rope_hf(proj(p + "q_proj.weight", x, true), m),
                              rope_hf(proj(p + "k_proj.weight", y, true), n));
    EXPECT_TRUE(torch::allclose(s0, s1, 1e-10, 1e-10)) << m << "," << n << "\n" << s0 << s1;
    // Without the permutation, HF's RoPE gives other scores.
    torch::Tensor s2 = scores(rope_hf(proj(p + "q_proj.weight", x, false), m),
                              rope_hf(proj(p + "k_proj.weight", y, false), n));
    EXPECT_FALSE(torch::allclose(s2, s0, 1e-4, 1e-4)) << m << "," << n;
  }
}

TEST(Llama2c, WrongFileSizeIsRejectedWithBothSizes) {
  const std::string dir = test::temp_dir("l2c");
  std::string bytes = test::read_file(test::data_path("stories260K.bin"));
  { std::ofstream(dir + "/cut.bin", std::ios::binary) << bytes.substr(0, bytes.size() - 4); }
  std::string msg = error_of([&] { open_model(dir + "/cut.bin"); });
  EXPECT_NE(msg.find("1056536 bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("exactly 1056540 bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find(dir + "/cut.bin"), std::string::npos) << msg;

  // A negative vocab_size promises a separate classifier the file does not have.
  std::string untied = bytes;
  int32_t v = -512;
  std::memcpy(&untied[20], &v, 4);
  { std::ofstream(dir + "/untied.bin", std::ios::binary) << untied; }
  msg = error_of([&] { open_model(dir + "/untied.bin"); });
  EXPECT_NE(msg.find("requires exactly " + std::to_string(1056540 + 512 * 64 * 4)),
            std::string::npos)
      << msg;

  std::string bad_heads = bytes;
  int32_t heads = 7;
  std::memcpy(&bad_heads[12], &heads, 4);
  { std::ofstream(dir + "/heads.bin", std::ios::binary) << bad_heads; }
  msg = error_of([&] { open_model(dir + "/heads.bin"); });
  EXPECT_NE(msg.find("n_heads = 7"), std::string::npos) << msg;
}

// ---- HF directories --------------------------------------------------------------------------

void expect_same_weights(const WeightSource& a, const WeightSource& b, const ModelConfig& c,
                         torch::ScalarType dtype) {
  for (const auto& [name, shape] : llama_weight_shapes(c)) {
    torch::Tensor x = a.get(name, dtype), y = b.get(name, dtype);
    ASSERT_EQ(x.scalar_type(), dtype);
    ASSERT_TRUE(torch::equal(x, y)) << name;
  }
}

TEST(HfDir, SaveAndOpenRoundTripIsBitExact) {
  auto src = open_model(test::data_path("stories260K.bin"));
  const std::string dir = test::temp_dir("hf") + "/out";
  save_hf_model(dir, src.config, *src.weights, torch::kFloat32, src.tokenizer_path);
  auto hf = open_model(dir);
  EXPECT_EQ(hf.config.to_hf_json(), src.config.to_hf_json());
  EXPECT_EQ(fs::path(hf.tokenizer_path).filename(), "tokenizer.bin");
  EXPECT_EQ(test::read_file(hf.tokenizer_path), test::read_file(src.tokenizer_path));
  EXPECT_FALSE(hf.weights->has("lm_head.weight"));
  expect_same_weights(*src.weights, *hf.weights, src.config, torch::kFloat32);

  auto* st = dynamic_cast<SafetensorsWeightSource*>(hf.weights.get());
  ASSERT_NE(st, nullptr);
  EXPECT_EQ(st->files().size(), 1u);
  EXPECT_EQ(st->metadata().value("format", ""), "pt");
  EXPECT_EQ(st->info("model.norm.weight").dtype, "F32");
  auto cfg = nlohmann::json::parse(test::read_file(dir + "/config.json"));
  EXPECT_EQ(cfg["torch_dtype"], "float32");
  EXPECT_EQ(cfg["architectures"][0], "LlamaForCausalLM");

  // bf16: the stored values are the fp32 weights rounded to bf16.
  save_hf_model(dir, src.config, *src.weights, torch::kBFloat16);
  auto hf16 = open_model(dir);
  EXPECT_EQ(dynamic_cast<SafetensorsWeightSource&>(*hf16.weights).info("model.norm.weight").dtype,
            "BF16");
  expect_same_weights(*src.weights, *hf16.weights, src.config, torch::kBFloat16);
}

TEST(HfDir, ShardedIndex) {
  auto src = open_model(test::data_path("stories260K.bin"));
  const std::string dir = test::temp_dir("hf") + "/sharded";
  // ~1 MB of fp32 weights in 300 kB shards.
  save_hf_model(dir, src.config, *src.weights, torch::kFloat32, "", 300'000);
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));
  auto index = nlohmann::json::parse(test::read_file(dir + "/model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], src.config.num_parameters() * 4);
  std::set<std::string> shards;
  for (auto& [k, v] : index["weight_map"].items()) shards.insert(v.get<std::string>());
  EXPECT_GE(shards.size(), 4u);
  EXPECT_TRUE(shards.count("model-00001-of-0000" + std::to_string(shards.size()) + ".safetensors"));
  auto hf = open_model(dir);
  EXPECT_EQ(dynamic_cast<SafetensorsWeightSource&>(*hf.weights).files().size(), shards.size());
  expect_same_weights(*src.weights, *hf.weights, src.config, torch::kFloat32);

  // Saving again unsharded removes the index, so the directory is unambiguous.
  save_hf_model(dir, src.config, *src.weights, torch::kFloat32);
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(dir + "/model.safetensors"));
}

TEST(HfDir, HandWrittenTwoShardIndex) {
  ModelConfig c;
  c.hidden_size = 8;
  c.intermediate_size = 16;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.vocab_size = 10;
  c.tie_word_embeddings = false;
  const std::string dir = test::temp_dir("hf2");
  std::map<std::string, torch::Tensor> a, b;
  nlohmann::json wm;
  int k = 0;
  for (const auto& [name, shape] : llama_weight_shapes(c)) {
    (k++ % 2 ? b : a)[name] = torch::randn(shape).to(torch::kFloat16);
    wm[name] = k % 2 ? "a.safetensors" : "b.safetensors";
  }
  a["extra.int_tensor"] = torch::arange(5, torch::kInt32);  // non-float tensors stay visible
  wm["extra.int_tensor"] = "a.safetensors";
  write_safetensors(dir + "/a.safetensors", a);
  write_safetensors(dir + "/b.safetensors", b);
  auto cfg = c.to_hf_json();
  { std::ofstream(dir + "/config.json") << cfg.dump(); }
  {
    std::ofstream(dir + "/model.safetensors.index.json")
        << nlohmann::json{{"weight_map", wm}}.dump();
  }
  auto m = open_model(dir + "/config.json");  // a file inside the directory works too
  EXPECT_TRUE(m.tokenizer_path.empty());
  for (const auto& [name, t] : a)
    EXPECT_TRUE(torch::equal(m.weights->get(name, t.scalar_type()), t)) << name;
  for (const auto& [name, t] : b) {
    torch::Tensor g = m.weights->get(name, torch::kFloat32);
    EXPECT_TRUE(torch::equal(g, t.to(torch::kFloat32))) << name;
    EXPECT_TRUE(g.is_contiguous());
  }

  // Index errors name the index, the shard and the tensor.
  wm["model.norm.weight"] = "c.safetensors";
  {
    std::ofstream(dir + "/model.safetensors.index.json")
        << nlohmann::json{{"weight_map", wm}}.dump();
  }
  std::string msg = error_of([&] { open_model(dir); });
  EXPECT_NE(msg.find("shard \"c.safetensors\""), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.norm.weight"), std::string::npos) << msg;
  wm["model.norm.weight"] = "a.safetensors";  // it is in b
  if (a.count("model.norm.weight")) wm["model.norm.weight"] = "b.safetensors";
  {
    std::ofstream(dir + "/model.safetensors.index.json")
        << nlohmann::json{{"weight_map", wm}}.dump();
  }
  msg = error_of([&] { open_model(dir); });
  EXPECT_NE(msg.find("puts tensor \"model.norm.weight\""), std::string::npos) << msg;
  wm["model.norm.weight"] = "../b.safetensors";
  {
    std::ofstream(dir + "/model.safetensors.index.json")
        << nlohmann::json{{"weight_map", wm}}.dump();
  }
  msg = error_of([&] { open_model(dir); });
  EXPECT_NE(msg.find("not a file name in the model directory"), std::string::npos) << msg;

  // A tensor with the wrong shape for the config.
  wm.erase("model.norm.weight");
  a.erase("model.norm.weight");
  b.erase("model.norm.weight");
  write_safetensors(dir + "/a.safetensors", [&] {
    auto x = a;
    x["model.norm.weight"] = torch::ones({9});
    return x;
  }());
  wm["model.norm.weight"] = "a.safetensors";
  {
    std::ofstream(dir + "/model.safetensors.index.json")
        << nlohmann::json{{"weight_map", wm}}.dump();
  }
  msg = error_of([&] { open_model(dir); });
  EXPECT_NE(msg.find("\"model.norm.weight\" has shape [9], expected [8]"), std::string::npos)
      << msg;
}

TEST(HfDir, ConfigErrorsNameTheKey) {
  nlohmann::json good = {{"model_type", "llama"},    {"hidden_size", 64},
                         {"intermediate_size", 172}, {"num_hidden_layers", 2},
                         {"num_attention_heads", 8}, {"vocab_size", 512}};
  ModelConfig c = ModelConfig::from_hf_json(good, "cfg.json");
  EXPECT_EQ(c.num_key_value_heads, 8);     // defaults to the number of heads
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);  // transformers' LlamaConfig default
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(ModelConfig::from_hf_json(c.to_hf_json(), "x").to_hf_json(), c.to_hf_json());

  auto err = [&](nlohmann::json patch) {
    nlohmann::json j = good;
    j.merge_patch(patch);
    return error_of([&] { ModelConfig::from_hf_json(j, "cfg.json"); });
  };
  auto has = [](const std::string& msg, const std::string& s) {
    EXPECT_NE(msg.find(s), std::string::npos) << "'" << s << "' not in: " << msg;
    EXPECT_NE(msg.find("cfg.json"), std::string::npos) << msg;
  };
  has(err({{"hidden_size", nullptr}}), "missing required key \"hidden_size\"");
  has(err({{"hidden_size", "64"}}), "\"hidden_size\" must be an integer, got \"64\"");
  has(err({{"rms_norm_eps", "small"}}), "\"rms_norm_eps\" must be a number");
  has(err({{"tie_word_embeddings", 1}}), "\"tie_word_embeddings\" must be true or false");
  has(err({{"model_type", "gpt2"}}), "model_type \"gpt2\" is not supported");
  has(err({{"rope_scaling", {{"type", "yarn"}, {"factor", 2.0}}}}), "rope_scaling.rope_type");
  has(err({{"rope_scaling", {{"type", "yarn"}, {"factor", 2.0}}}}), "not supported");
  // transformers >= 5: RoPE settings in "rope_parameters".
  nlohmann::json v5 = good;
  v5["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500000.0}};
  EXPECT_DOUBLE_EQ(ModelConfig::from_hf_json(v5, "v5").rope_theta, 500000.0);
  has(err({{"rope_parameters", {{"rope_type", "yarn"}, {"rope_theta", 5e5}}}}),
      "rope_parameters.rope_type \"yarn\" is not supported");
  has(err({{"rope_parameters", {{"rope_theta", "big"}}}}), "\"rope_theta\" must be a number");
  has(err({{"num_key_value_heads", 3}}),
      "num_attention_heads (8) must be divisible by num_key_value_heads (3)");
  has(err({{"hidden_act", "gelu"}}), "\"hidden_act\"");
  has(err({{"sliding_window", 16}}), "sliding_window");
  nlohmann::json mistral = good;
  mistral.merge_patch({{"model_type", "mistral"}, {"sliding_window", nullptr}});
  EXPECT_NO_THROW(ModelConfig::from_hf_json(mistral, "m"));
  has(error_of([&] { ModelConfig::from_hf_json(nlohmann::json::array(), "cfg.json"); }),
      "expected a JSON object");

  // In a directory: the file is named, and a broken JSON says so.
  const std::string dir = test::temp_dir("cfg");
  { std::ofstream(dir + "/config.json") << "{\"hidden_size\": 64,"; }
  std::string msg = error_of([&] { open_model(dir); });
  EXPECT_NE(msg.find(dir + "/config.json: not valid JSON"), std::string::npos) << msg;
  std::string empty = test::temp_dir("cfg");
  msg = error_of([&] { open_model(empty); });
  EXPECT_NE(msg.find("no config.json in " + empty), std::string::npos) << msg;
  msg = error_of([&] { open_model(empty + "/nothing.bin"); });
  EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;
}

TEST(QtuneConvert, BinToHfDirRoundTrip) {
  const std::string out = test::temp_dir("convert") + "/hf";
  auto r = test::run_program({test::bin_path("qtune-convert"), "--model",
                              test::data_path("stories260K.bin"), "--tokenizer",
                              test::data_path("llama2_tokenizer.model"), "--out", out});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto src = open_model(test::data_path("stories260K.bin"));
  auto hf = open_model(out);
  EXPECT_EQ(fs::path(hf.tokenizer_path).filename(), "tokenizer.model");
  expect_same_weights(*src.weights, *hf.weights, src.config, torch::kFloat32);

  r = test::run_program({test::bin_path("qtune-convert"), "--model",
                         test::data_path("stories260K.bin"), "--out", out, "--dtype", "fp8"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("--dtype must be fp32, bf16 or fp16, got \"fp8\""), std::string::npos)
      << r.output;
  r = test::run_program({test::bin_path("qtune-convert"), "--out", out});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("--model is required"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace qtune
