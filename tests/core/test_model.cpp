// The Llama model: parity with llama2.c (greedy text), KV cache, gradients, and the slot
// builder's promises (LoRA with B = 0 is the base model; only adapters train under lora).
#include <gtest/gtest.h>

#include "qtune/error.h"
#include "qtune/generate.h"
#include "qtune/model.h"
#include "qtune/model_files.h"
#include "qtune/registry.h"
#include "qtune/tokenizer.h"
#include "test_util.h"

using namespace qtune;

namespace {

using qtune::test::plugins;
using qtune::test::tiny_config;

using qtune::test::lora_spec;

}  // namespace

TEST(Model, GreedyGenerationMatchesLlama2cReference) {
  ModelFiles f = open_model(test::data_path("stories260K.bin"));
  auto tok = load_tokenizer(test::data_path("tok512.bin"));
  TuningSpec spec;
  LlamaForCausalLM model(f.config, *f.weights, spec);
  GenerateOptions o;
  o.max_new_tokens = 256;  // run.c's default steps: each of its 256 forward passes prints a token
  o.stop_tokens = {tok->bos_id()};  // run.c stops when the model emits BOS
  std::vector<int64_t> prompt{tok->bos_id()};
  auto out = generate(*model, prompt, o);
  std::string text;
  int64_t prev = tok->bos_id();
  for (auto id : out) {
    text += tok->decode_token(static_cast<int>(prev), static_cast<int>(id));
    prev = id;
  }
  std::string ref = test::read_file(test::data_path("stories260K_greedy_reference.txt"));
  while (!ref.empty() && (ref.back() == '\n' || ref.back() == ' ')) ref.pop_back();
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  EXPECT_EQ(text, ref);
}

TEST(Model, KVCacheMatchesFullForward) {
  auto c = tiny_config();
  auto w = random_weights(c, 7);
  TuningSpec spec;
  LlamaForCausalLM model(c, *w, spec);
  torch::NoGradGuard no_grad;
  auto tokens = torch::randint(0, c.vocab_size, {2, 12}, torch::kLong);
  auto full = model->forward(tokens);
  auto cache = model->new_cache(2, 12);
  auto a = model->forward(tokens.narrow(1, 0, 5), &cache);
  auto b = model->forward(tokens.narrow(1, 5, 1), &cache);
  auto rest = model->forward(tokens.narrow(1, 6, 6), &cache);
  auto inc = torch::cat({a, b, rest}, 1);
  EXPECT_TRUE(torch::allclose(full, inc, 1e-5, 1e-5)) << (full - inc).abs().max();
}

TEST(Model, GradientsMatchFiniteDifferences) {
  // fp64 end to end so central differences are exact to ~1e-8.
  auto c = tiny_config(16, true);
  auto w = random_weights(c, 11);
  TuningSpec spec;
  spec.dtype = torch::kFloat64;
  LlamaForCausalLM model(c, *w, spec);
  auto tokens = torch::randint(0, c.vocab_size, {2, 6}, torch::kLong);
  auto targets = torch::randint(0, c.vocab_size, {2, 6}, torch::kLong);
  targets[0][0] = -100;  // ignored positions take part too
  model->zero_grad();
  model->loss(tokens, targets).first.backward();
  int checked = 0;
  for (const auto& [name, p] : model->trainable_parameters()) {
    ASSERT_TRUE(p.grad().defined()) << name;
    ASSERT_EQ(p.scalar_type(), torch::kFloat64) << name;
    auto flat = p.detach().view({-1});
    auto grad = p.grad().view({-1});
    for (int64_t idx : {int64_t{0}, flat.numel() / 2, flat.numel() - 1}) {
      const double eps = 1e-6, orig = flat[idx].item<double>();
      torch::NoGradGuard no_grad;
      flat[idx] = orig + eps;
      const double up = model->loss(tokens, targets).first.item<double>();
      flat[idx] = orig - eps;
      const double down = model->loss(tokens, targets).first.item<double>();
      flat[idx] = orig;
      const double numeric = (up - down) / (2 * eps);
      EXPECT_NEAR(grad[idx].item<double>(), numeric, 1e-6 + 1e-5 * std::abs(numeric))
          << name << "[" << idx << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 30);
}

TEST(Model, ActivationCheckpointingGivesTheSameGradients) {
  auto c = tiny_config();
  auto w = random_weights(c, 3);
  auto tokens = torch::randint(0, c.vocab_size, {2, 8}, torch::kLong);
  std::vector<torch::Tensor> grads[2];
  for (int ckpt = 0; ckpt < 2; ++ckpt) {
    torch::manual_seed(5);
    TuningSpec spec;
    LlamaForCausalLM model(c, *w, spec);
    model->set_activation_checkpointing(ckpt == 1);
    model->loss(tokens, tokens).first.backward();
    for (const auto& [_, p] : model->trainable_parameters()) grads[ckpt].push_back(p.grad().clone());
  }
  ASSERT_EQ(grads[0].size(), grads[1].size());
  for (size_t i = 0; i < grads[0].size(); ++i)
    EXPECT_TRUE(torch::allclose(grads[0][i], grads[1][i], 1e-5, 1e-6)) << i;
}

TEST(Model, LoraWithZeroBIsExactlyTheBaseModel) {
  for (bool tied : {false, true}) {
    auto c = tiny_config(16, tied);
    auto w = random_weights(c, 21);
    TuningSpec full;
    LlamaForCausalLM base(c, *w, full);
    LlamaForCausalLM lora(c, *w, lora_spec());
    torch::NoGradGuard no_grad;
    auto tokens = torch::randint(0, c.vocab_size, {2, 9}, torch::kLong);
    EXPECT_TRUE(torch::equal(base->forward(tokens), lora->forward(tokens))) << "tied=" << tied;
  }
}

TEST(Model, AFrozenLookupOnlyEmbeddingKeepsItsNarrowerStoredDtype) {
  // The same bf16 values stored as BF16 and as F32: under fp32 compute a frozen embedding that
  // is only looked up stays bf16 (half the bytes) and the model computes exactly the same; a
  // trained one (full) or one a dense tied head multiplies by (lora) is fp32 as before.
  auto src = open_model(test::data_path("stories260K.bin"));  // tied embeddings
  const std::string root = test::temp_dir("embedding_dtype");
  save_hf_model(root + "/bf16", src.config, *src.weights, torch::kBFloat16);
  auto bf16 = open_model(root + "/bf16");
  save_hf_model(root + "/f32", bf16.config, *bf16.weights, torch::kFloat32);
  auto f32 = open_model(root + "/f32");
  ASSERT_EQ(bf16.weights->stored_dtype("model.embed_tokens.weight"), torch::kBFloat16);
  ASSERT_EQ(f32.weights->stored_dtype("model.embed_tokens.weight"), torch::kFloat32);
  EXPECT_EQ(f32.weights->stored_dtype("no.such.tensor"), std::nullopt);

  const auto qlora = TuningSpec::for_training(TrainType::kQlora, torch::kFloat32, plugins(),
                                              "nf4", {}, false, "lora", {}, {"all-linear"});
  const TuningSpec full;
  struct Case {
    const TuningSpec spec;
    torch::ScalarType expected;
  };
  const std::vector<std::pair<std::string, Case>> cases = {
      {"qlora", {qlora, torch::kBFloat16}},  // the head is a quantized copy
      {"lora", {lora_spec(), torch::kFloat32}},  // the dense tied head is this very tensor
      {"full", {full, torch::kFloat32}}};  // trained: an fp32 master
  const auto tokens = torch::randint(0, src.config.vocab_size, {2, 11}, torch::kLong);
  for (const auto& [name, c] : cases) {
    LlamaForCausalLM a(bf16.config, *bf16.weights, c.spec);
    LlamaForCausalLM b(f32.config, *f32.weights, c.spec);
    EXPECT_EQ(a->model->embed_tokens->weight.scalar_type(), c.expected) << name;
    EXPECT_EQ(b->model->embed_tokens->weight.scalar_type(), torch::kFloat32) << name;
    const int64_t saved = c.expected == torch::kBFloat16
                              ? src.config.vocab_size * src.config.hidden_size * 2
                              : 0;
    EXPECT_EQ(b->base_weight_bytes() - a->base_weight_bytes(), saved) << name;
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(torch::equal(a->forward(tokens), b->forward(tokens))) << name;
  }
}

TEST(Model, OnlyAdapterParametersTrainUnderLora) {
  auto c = tiny_config();
  auto w = random_weights(c, 2);
  LlamaForCausalLM model(c, *w, lora_spec());
  auto tokens = torch::randint(0, c.vocab_size, {2, 8}, torch::kLong);
  model->loss(tokens, tokens).first.backward();
  auto trainable = model->trainable_parameters();
  // 7 projections per layer + the head, each with lora_A and lora_B
  EXPECT_EQ(trainable.size(), static_cast<size_t>((7 * c.num_hidden_layers + 1) * 2));
  for (const auto& [name, p] : trainable) {
    EXPECT_NE(name.find(".adapter.lora_"), std::string::npos) << name;
    ASSERT_TRUE(p.grad().defined()) << name;
    if (name.find("lora_B") != std::string::npos)
      EXPECT_GT(p.grad().abs().sum().item<double>(), 0.0) << name;  // B = 0: only B moves first
  }
  for (const auto& p : model->parameters())
    if (!p.requires_grad()) EXPECT_FALSE(p.grad().defined());
  for (const auto& b : model->buffers()) {
    EXPECT_FALSE(b.requires_grad());
    EXPECT_FALSE(b.grad().defined());
  }
}

TEST(Model, ShapeMismatchAndMissingTensorsNamed) {
  auto c = tiny_config();
  auto w = random_weights(c, 1);
  auto bigger = c;
  bigger.intermediate_size = 48;
  TuningSpec spec;
  try {
    LlamaForCausalLM m(bigger, *w, spec);
    FAIL() << "expected a shape error";
  } catch (const UserError& e) {
    // slots are built in model order, so the first mismatch met is layer 0's gate_proj
    EXPECT_NE(std::string(e.what()).find("model.layers.0.mlp.gate_proj.weight"), std::string::npos)
        << e.what();
  }
  TuningSpec bad = lora_spec();  // an adapter beside a trainable base
  bad.base.kind = BaseSpec::Kind::kTrainable;
  EXPECT_THROW(LlamaForCausalLM(c, *w, bad), UserError);
  TuningSpec no_backend;  // a quantized base without a backend
  no_backend.base.kind = BaseSpec::Kind::kQuantized;
  EXPECT_THROW(LlamaForCausalLM(c, *w, no_backend), UserError);
}
