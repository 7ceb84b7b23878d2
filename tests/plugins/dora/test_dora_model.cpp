// DoRA through the registry, as users reach it, on every kind of base: dense frozen (lora) and
// each quantization backend (qlora = QDoRA). B = 0 is the base model exactly; the magnitude
// starts at the row norms of the dequantized base; it trains; merging and the PEFT round trip
// give the adapted model's logits.
#include <gtest/gtest.h>

#include "qtune/model.h"
#include "qtune/peft.h"
#include "qtune/registry.h"
#include "test_util.h"

using namespace qtune;

namespace {

using qtune::test::plugins;

// Sizes every backend's default grouping divides (64-element groups along the input).
ModelConfig config(bool tied = false) {
  ModelConfig c = qtune::test::tiny_config(64, tied);
  c.intermediate_size = 128;
  c.vocab_size = 64;
  return c;
}

TuningSpec dora_spec(const std::string& quant) {
  return TuningSpec::for_training(quant.empty() ? TrainType::kLora : TrainType::kQlora,
                                  torch::kFloat32, plugins(), quant, {}, false, "dora",
                                  Json{{"rank", 4}}, {"all-linear", "output"});
}

const std::vector<std::string> kBases = {"", "nf4", "hqq", "int8"};

}  // namespace

TEST(DoraModel, ZeroBIsTheBaseModelOnEveryBase) {
  for (const auto& quant : kBases) {
    for (bool tied : {false, true}) {
      auto c = config(tied);
      auto w = random_weights(c, 3);
      LlamaForCausalLM m(c, *w, dora_spec(quant));
      torch::NoGradGuard no_grad;
      auto tokens = torch::randint(0, c.vocab_size, {2, 9}, torch::kLong);
      auto adapted = m->forward(tokens);
      m->set_adapters_enabled(false);
      EXPECT_TRUE(torch::equal(adapted, m->forward(tokens))) << quant << " tied=" << tied;
      // QDoRA: the magnitude is the row norm of the dequantized base, not of the original W.
      for (const auto& [path, slot] : m->slots()) {
        const auto mag = slot->adapter()->state().tensors.at("lora_magnitude_vector");
        EXPECT_TRUE(torch::allclose(mag, slot->base_weight(torch::kFloat32).norm(2, {1}), 1e-6, 0))
            << quant << " " << path;
      }
    }
  }
}

TEST(DoraModel, TrainsMergesAndRoundTripsThroughPeft) {
  for (const auto& quant : kBases) {
    auto c = config();
    auto w = random_weights(c, 5);
    const auto spec = dora_spec(quant);
    torch::manual_seed(1);
    LlamaForCausalLM m(c, *w, spec);
    auto tokens = torch::randint(0, c.vocab_size, {4, 16}, torch::kLong);
    std::vector<torch::Tensor> params;
    for (const auto& [name, p] : m->trainable_parameters()) {
      EXPECT_NE(name.find(".adapter."), std::string::npos) << name;
      params.push_back(p);
    }
    EXPECT_EQ(params.size(), static_cast<size_t>((7 * c.num_hidden_layers + 1) * 3));
    torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-2));
    double first = 0, last = 0;
    for (int step = 0; step < 20; ++step) {
      opt.zero_grad();
      auto loss = m->loss(tokens, tokens).first;
      loss.backward();
      opt.step();
      (step == 0 ? first : last) = loss.item<double>();
    }
    EXPECT_LT(last, first - 0.1) << quant;
    torch::NoGradGuard no_grad;
    const auto adapted = m->forward(tokens);

    // Merged onto the (dequantized) base: a dense model with the same logits.
    auto merged_w = model_weights(*m, /*merge_adapters=*/true);
    LlamaForCausalLM merged(c, *merged_w, TuningSpec());
    EXPECT_LT((merged->forward(tokens) - adapted).abs().max().item<double>(), 1e-4) << quant;

    // PEFT layout: magnitudes under lora_magnitude_vector, use_dora in the config; a fresh
    // model loading it computes the same.
    const std::string dir = test::temp_dir("dora-peft");
    save_peft_adapter(dir, *m, "base");
    EXPECT_EQ(read_peft_config(dir)["use_dora"], true);
    bool has_magnitude = false;
    for (const auto& [key, _] : peft_adapter_tensors(*m))
      has_magnitude |= key == "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector";
    EXPECT_TRUE(has_magnitude);
    torch::manual_seed(2);
    LlamaForCausalLM fresh(c, *w, spec);
    load_peft_adapter(dir, *fresh);
    EXPECT_TRUE(torch::equal(fresh->forward(tokens), adapted)) << quant;
  }
}
