// Activation checkpointing (train.activation_checkpointing): for every train type and every
// quantization backend, training with each decoder layer recomputed in backward gives the same
// per-step losses and gradients as training that keeps the activations, dropout included; and
// the recompute really happens.
#include <gtest/gtest.h>

#include "qtune/model.h"
#include "qtune/recompute.h"
#include "qtune/registry.h"
#include "test_util.h"

using namespace qtune;

namespace {

using qtune::test::plugins;
using qtune::test::tiny_config;

// An adapter that counts its forward calls and otherwise is the lora plugin's adapter.
class CountingAdapter : public Adapter {
 public:
  CountingAdapter(std::shared_ptr<Adapter> inner, std::shared_ptr<int> calls)
      : inner_(register_module("inner", std::move(inner))), calls_(std::move(calls)) {}
  torch::Tensor forward(const torch::Tensor& x) override {
    ++*calls_;
    return inner_->forward(x);
  }
  torch::Tensor delta_weight() const override { return inner_->delta_weight(); }
  TensorState state() const override { return inner_->state(); }
  void load(const TensorState& s) override { inner_->load(s); }
  Json peft_config() const override { return inner_->peft_config(); }

 private:
  std::shared_ptr<Adapter> inner_;
  std::shared_ptr<int> calls_;
};

class CountingFactory : public AdapterFactory {
 public:
  explicit CountingFactory(std::shared_ptr<AdapterFactory> inner) : inner_(std::move(inner)) {}
  std::string name() const override { return "counting-" + inner_->name(); }
  std::vector<OptionSpec> option_schema() const override { return inner_->option_schema(); }
  std::shared_ptr<Adapter> create(int64_t in, int64_t out, const Json& o) const override {
    auto calls = std::make_shared<int>(0);
    counters.push_back(calls);
    return std::make_shared<CountingAdapter>(inner_->create(in, out, o), calls);
  }
  mutable std::vector<std::shared_ptr<int>> counters;  // in creation (= model) order

 private:
  std::shared_ptr<AdapterFactory> inner_;
};

TuningSpec spec_for(TrainType type, const std::string& quant, torch::ScalarType dtype,
                    double dropout) {
  return TuningSpec::for_training(type, dtype, plugins(), quant, {}, false, "lora",
                                  Json{{"rank", 4}, {"dropout", dropout}},
                                  {"all-linear", "output"});
}

struct Trace {
  std::vector<double> losses;                    // per step
  std::vector<std::vector<torch::Tensor>> grads;  // per step, per trainable parameter
};

// Three AdamW steps on fixed batches (B starts at zero, so A's gradients are non-zero from the
// second step on). Everything random (adapter init, dropout) is seeded, so two
// runs differ only in `checkpointing`.
Trace train(const TuningSpec& spec, bool checkpointing) {
  auto c = tiny_config(32);
  auto w = random_weights(c, 17);
  torch::manual_seed(3);
  auto tokens = torch::randint(0, c.vocab_size, {2, 12}, torch::kLong);
  auto targets = torch::randint(0, c.vocab_size, {2, 12}, torch::kLong);
  targets[1][3] = -100;
  torch::manual_seed(4);
  LlamaForCausalLM model(c, *w, spec);
  model->set_activation_checkpointing(checkpointing);
  model->train();
  std::vector<torch::Tensor> params;
  for (auto& [_, p] : model->trainable_parameters()) params.push_back(p);
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-2));
  Trace t;
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    auto loss = model->loss(tokens, targets).first;
    loss.backward();
    t.losses.push_back(loss.item<double>());
    t.grads.emplace_back();
    for (auto& p : params) {
      EXPECT_TRUE(p.grad().defined()) << "step " << step;
      t.grads.back().push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
    }
    opt.step();
  }
  return t;
}

void expect_same_training(const TuningSpec& spec, const std::string& what, double tol) {
  const Trace kept = train(spec, false), recomputed = train(spec, true);
  ASSERT_EQ(kept.losses.size(), recomputed.losses.size());
  for (size_t s = 0; s < kept.losses.size(); ++s) {
    EXPECT_NEAR(kept.losses[s], recomputed.losses[s], tol) << what << " step " << s;
    ASSERT_EQ(kept.grads[s].size(), recomputed.grads[s].size()) << what;
    for (size_t i = 0; i < kept.grads[s].size(); ++i) {
      const auto& a = kept.grads[s][i];
      const auto& b = recomputed.grads[s][i];
      if (!a.defined() || !b.defined()) continue;  // already reported
      EXPECT_LE((a - b).abs().max().item<double>(), tol) << what << " step " << s << " param " << i;
    }
  }
  // A non-trivial gradient, or the comparison above proves nothing.
  double norm = 0;
  for (const auto& g : kept.grads[0]) norm += g.abs().sum().item<double>();
  EXPECT_GT(norm, 0.0) << what;
}

}  // namespace

TEST(ActivationCheckpointing, FullTrainingIsUnchanged) {
  expect_same_training(spec_for(TrainType::kFull, "", torch::kFloat32, 0.0), "full", 1e-6);
}

TEST(ActivationCheckpointing, LoraWithDropoutIsUnchanged) {
  // The first layer's input comes from the frozen embedding and does not require grad.
  expect_same_training(spec_for(TrainType::kLora, "", torch::kFloat32, 0.1), "lora", 1e-6);
}

TEST(ActivationCheckpointing, QloraIsUnchangedWithEveryBackend) {
  for (const std::string quant : {"nf4", "hqq", "int8"})
    expect_same_training(spec_for(TrainType::kQlora, quant, torch::kFloat32, 0.1),
                         "qlora " + quant, 1e-6);
}

TEST(ActivationCheckpointing, Bf16LoraAndQloraTrain) {
  // bf16 compute: the recompute replays the same bf16 operations, so it stays within bf16
  // rounding of the kept-activations run (fp32 masters receive the gradients).
  expect_same_training(spec_for(TrainType::kLora, "", torch::kBFloat16, 0.1), "lora bf16", 1e-3);
  expect_same_training(spec_for(TrainType::kQlora, "nf4", torch::kBFloat16, 0.1), "qlora bf16",
                       1e-3);
}

TEST(ActivationCheckpointing, EachLayerRunsAgainInBackward) {
  auto c = tiny_config(32);
  auto w = random_weights(c, 5);
  auto tokens = torch::randint(0, c.vocab_size, {2, 8}, torch::kLong);
  for (bool ckpt : {false, true}) {
    auto spec = spec_for(TrainType::kLora, "", torch::kFloat32, 0.0);
    auto factory = std::make_shared<CountingFactory>(spec.adapter.factory);
    spec.adapter.factory = factory;
    LlamaForCausalLM model(c, *w, spec);
    model->set_activation_checkpointing(ckpt);
    auto loss = model->loss(tokens, tokens).first;
    // 7 adapted projections per layer, then the head
    ASSERT_EQ(factory->counters.size(), static_cast<size_t>(7 * c.num_hidden_layers + 1));
    for (const auto& n : factory->counters) EXPECT_EQ(*n, 1) << "forward, ckpt=" << ckpt;
    loss.backward();
    for (size_t i = 0; i + 1 < factory->counters.size(); ++i)
      EXPECT_EQ(*factory->counters[i], ckpt ? 2 : 1) << "layer adapter " << i << ", ckpt=" << ckpt;
    EXPECT_EQ(*factory->counters.back(), 1) << "the head is not in a checkpointed layer";
  }
}

TEST(ActivationCheckpointing, RecomputeReplaysRandomnessAndReachesParameters) {
  // A frozen input (no grad) and a parameter read from outside the input list: the gradient
  // reaches the parameter, dropout draws the same mask on recompute although the generator
  // moved on after forward, and backward leaves the generator where it found it.
  auto x = torch::randn({5, 7});
  auto p = torch::randn({7, 3}).requires_grad_(true);
  auto fn = [&p](const std::vector<torch::Tensor>& in) {
    return torch::dropout(torch::matmul(in[0], p), 0.5, /*train=*/true).tanh();
  };
  torch::manual_seed(9);
  auto direct = fn({x});
  direct.sum().backward();
  const auto direct_grad = p.grad().clone();

  p.mutable_grad() = torch::Tensor();
  torch::manual_seed(9);
  auto ckpt = recompute_in_backward(fn, {x}, {p});
  ASSERT_TRUE(ckpt.requires_grad());
  EXPECT_TRUE(torch::equal(direct, ckpt.detach()));
  torch::rand({4});  // draws between forward and backward must not change the replay
  auto gen = at::globalContext().defaultGenerator(torch::kCPU);
  const auto state_before = gen.get_state();
  ckpt.sum().backward();
  ASSERT_TRUE(p.grad().defined());
  EXPECT_TRUE(torch::equal(direct_grad, p.grad()));
  EXPECT_TRUE(torch::equal(state_before, gen.get_state()));
}

TEST(ActivationCheckpointing, NothingToTrainGivesNoGraph) {
  auto x = torch::randn({3, 4});
  auto frozen = torch::randn({4, 4});
  auto y = recompute_in_backward(
      [&](const std::vector<torch::Tensor>& in) { return in[0].matmul(frozen); }, {x}, {frozen});
  EXPECT_FALSE(y.requires_grad());
  EXPECT_TRUE(torch::equal(y, x.matmul(frozen)));
}
