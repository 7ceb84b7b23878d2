// Pre-quantized directories: what save_quantized_model writes loads back into a qlora model
// identical to quantizing on the fly, and a mismatched backend is refused by name.
#include <gtest/gtest.h>

#include "qtune/error.h"
#include "qtune/model.h"
#include "qtune/quantized_model.h"
#include "qtune/registry.h"
#include "test_util.h"

using namespace qtune;

namespace {

using qtune::test::plugins;

TuningSpec qlora(const std::string& backend) {
  return TuningSpec::for_training(TrainType::kQlora, torch::kFloat32, plugins(), backend, {},
                                  false, "lora", {}, {"q", "v"});
}

ModelConfig small(bool tied) {
  ModelConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.vocab_size = 96;
  c.tie_word_embeddings = tied;
  return c;
}

}  // namespace

TEST(QuantizedModel, RoundTripEqualsQuantizingOnTheFly) {
  for (bool tied : {false, true}) {
    const auto c = small(tied);
    auto w = random_weights(c, 5);
    const auto spec = qlora("nf4");
    const auto dir = test::temp_dir("quantized");
    save_quantized_model(dir, c, *w, *spec.base.quant, spec.base.quant_options, false, torch::kFloat32);
    ModelFiles files = open_model(dir);
    EXPECT_TRUE(files.weights->has_quantized("model.layers.0.mlp.down_proj.weight"));
    EXPECT_FALSE(files.weights->has_quantized("model.embed_tokens.weight"));
    EXPECT_EQ(files.weights->shape("model.layers.0.mlp.down_proj.weight"),
              (std::vector<int64_t>{64, 128}));
    torch::manual_seed(1);
    LlamaForCausalLM a(c, *w, spec);
    torch::manual_seed(1);
    LlamaForCausalLM b(files.config, *files.weights, spec);
    torch::NoGradGuard no_grad;
    auto tokens = torch::randint(0, c.vocab_size, {2, 7}, torch::kLong);
    EXPECT_TRUE(torch::equal(a->forward(tokens), b->forward(tokens))) << "tied=" << tied;
    EXPECT_EQ(a->linear_weight_bytes(), b->linear_weight_bytes());
  }
}

TEST(QuantizedModel, OtherBackendAndDenseTrainingAreRefused) {
  const auto c = small(false);
  auto w = random_weights(c, 6);
  const auto nf4 = qlora("nf4");
  const auto dir = test::temp_dir("quantized");
  save_quantized_model(dir, c, *w, *nf4.base.quant, nf4.base.quant_options, false, torch::kBFloat16);
  ModelFiles files = open_model(dir);
  try {
    LlamaForCausalLM m(files.config, *files.weights, qlora("int8"));
    FAIL() << "expected a backend mismatch";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("quantized with 'nf4'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("int8"), std::string::npos) << e.what();
  }
  TuningSpec full;
  try {
    LlamaForCausalLM m(files.config, *files.weights, full);
    FAIL() << "expected a refusal to train a packed base densely";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("only stored quantized"), std::string::npos) << e.what();
  }
}
