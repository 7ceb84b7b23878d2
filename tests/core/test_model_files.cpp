// Model files: the llama2.c loader on stories260K.bin (shapes, tying, rotary permutation, size
// validation), HF directories (single, sharded, config.json errors), and qtune-convert.
#include <filesystem>
#include <fstream>
#include <set>

#include <gtest/gtest.h>

#include "qtune/error.h"
#include "qtune/llama2c.h"
#include "qtune/model_files.h"
#include "qtune/safetensors.h"
#include "qtune/weight_source.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace qtune {
namespace {

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a UserError";
  return "";
}

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
  EXPECT_EQ(c.num_parameters(), 512 * 64 + 5 * (64 * 64 * 2 + 2 * 32 * 64 + 3 * 64 * 172 + 128) + 64);
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

TEST(Llama2c, WrongFileSizeIsRejectedWithBothSizes) {
  const std::string dir = test::temp_dir("l2c");
  std::string bytes = test::read_file(test::data_path("stories260K.bin"));
  {
    std::ofstream(dir + "/cut.bin", std::ios::binary) << bytes.substr(0, bytes.size() - 4);
  }
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
            std::string::npos) << msg;

  std::string bad_heads = bytes;
  int32_t heads = 7;
  std::memcpy(&bad_heads[12], &heads, 4);
  { std::ofstream(dir + "/heads.bin", std::ios::binary) << bad_heads; }
  msg = error_of([&] { open_model(dir + "/heads.bin"); });
  EXPECT_NE(msg.find("n_heads = 7"), std::string::npos) << msg;
}

}  // namespace
}  // namespace qtune
