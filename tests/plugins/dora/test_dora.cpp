// Unit tests of the DoRA plugin's math, linked against its objects: magnitude initialisation,
// B = 0 is the base exactly, the memory-light norm equals the explicit one (through merging),
// finite-difference gradients with the norm detached, dropout, state and PEFT config.
#include <gtest/gtest.h>

#include "dora.h"
#include "qtune/error.h"
#include "test_util.h"

using qtune::AdapterBase;
using qtune::Json;
using qtune::dora::DoraAdapter;
using qtune::dora::DoraFactory;

namespace {

// A dense frozen base W for the adapter to bind to.
AdapterBase dense_base(const torch::Tensor& w) {
  AdapterBase b;
  b.weight = [w](torch::ScalarType dtype) { return w.to(dtype); };
  b.linear = [w](const torch::Tensor& x) { return torch::linear(x, w.to(x.scalar_type())); };
  return b;
}

std::shared_ptr<DoraAdapter> make(const torch::Tensor& w, const Json& options = {{"rank", 4}}) {
  auto a =
      std::dynamic_pointer_cast<DoraAdapter>(DoraFactory().create(w.size(1), w.size(0), options));
  EXPECT_TRUE(a);
  a->bind_base(dense_base(w));
  return a;
}

void randomize(DoraAdapter& a, uint64_t seed) {
  torch::NoGradGuard g;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const_cast<torch::Tensor&>(a.lora_B()).normal_(0.0, 0.3, gen);
  const_cast<torch::Tensor&>(a.magnitude())
      .mul_(1.0 + 0.2 * torch::rand({a.magnitude().size(0)}, gen));
}

}  // namespace

TEST(Dora, ParametersNamedAsPeftAndMagnitudeIsTheRowNorm) {
  torch::manual_seed(1);
  auto w = torch::randn({6, 10});
  auto a = make(w);
  std::map<std::string, torch::Tensor> params;
  for (const auto& p : a->named_parameters()) params[p.key()] = p.value();
  ASSERT_EQ(params.size(), 3u);
  EXPECT_EQ(params.at("lora_A.weight").sizes(), (std::vector<int64_t>{4, 10}));
  EXPECT_EQ(params.at("lora_B.weight").sizes(), (std::vector<int64_t>{6, 4}));
  EXPECT_EQ(params.at("lora_magnitude_vector").sizes(), (std::vector<int64_t>{6}));
  EXPECT_TRUE(torch::allclose(a->magnitude(), w.norm(2, {1}), 1e-6, 0));
  EXPECT_EQ(a->lora_B().abs().sum().item<float>(), 0.0f);
  // Unbound, it says what is missing instead of computing with nothing.
  auto unbound = DoraFactory().create(10, 6, Json{{"rank", 2}});
  auto msg = qtune::test::user_error_of([&] {
    unbound->apply(torch::randn({2, 10}), torch::randn({2, 6}));
  });
  EXPECT_NE(msg.find("not bound to a base projection"), std::string::npos) << msg;
}

TEST(Dora, ZeroBIsExactlyTheBase) {
  torch::manual_seed(2);
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    auto w = torch::randn({24, 32}).to(dtype);
    auto a = make(w);
    auto x = torch::randn({3, 5, 32}).to(dtype);
    auto y = torch::linear(x, w);
    EXPECT_TRUE(torch::equal(a->apply(x, y), y)) << dtype;
    EXPECT_EQ(a->forward(x).abs().max().item<float>(), 0.0f);
    EXPECT_EQ(a->delta_weight().abs().max().item<float>(), 0.0f);
  }
}

TEST(Dora, MergedWeightGivesTheSameOutput) {
  // delta_weight computes ||W + s B A|| explicitly; apply() by the [out, r] expansion.
  torch::manual_seed(3);
  for (bool rslora : {false, true}) {
    auto w = torch::randn({12, 20}, torch::kFloat64).to(torch::kFloat32);
    auto a = make(w, {{"rank", 3}, {"alpha", 5.0}, {"use_rslora", rslora}});
    randomize(*a, 7);
    auto x = torch::randn({4, 20});
    auto merged = torch::linear(x, w + a->delta_weight());
    auto out = a->apply(x, torch::linear(x, w));
    EXPECT_TRUE(torch::allclose(out, merged, 1e-5, 1e-5)) << (out - merged).abs().max();
    // ... and the merged rows have exactly the trained magnitudes.
    EXPECT_TRUE(torch::allclose((w + a->delta_weight()).norm(2, {1}), a->magnitude(), 1e-5, 0));
  }
}

TEST(Dora, GradientsMatchFiniteDifferencesWithTheNormDetached) {
  torch::manual_seed(4);
  auto w = torch::randn({5, 7}, torch::kFloat64);
  auto a = make(w, {{"rank", 2}, {"alpha", 3.0}});
  a->to(torch::kFloat64);
  randomize(*a, 9);
  {
    torch::NoGradGuard g;
    const_cast<torch::Tensor&>(a->lora_A()).normal_();
  }
  auto x = torch::randn({3, 7}, torch::kFloat64);
  auto g = torch::randn({3, 5}, torch::kFloat64);
  const double s = 3.0 / 2;
  auto loss_of = [&] { return (a->apply(x, torch::linear(x, w)) * g).sum(); };
  a->zero_grad();
  loss_of().backward();

  // The paper's gradient treats ||V|| as a constant (section 4.3): the reference is
  // m / norm0 * (x W^T + s x A^T B^T) with norm0 fixed at the current point.
  torch::NoGradGuard no_grad;
  const auto norm0 = (w + s * torch::mm(a->lora_B(), a->lora_A())).norm(2, {1});
  auto reference = [&] {
    auto v = w + s * torch::mm(a->lora_B(), a->lora_A());
    return (torch::linear(x, v) * (a->magnitude() / norm0) * g).sum().item<double>();
  };
  EXPECT_NEAR(reference(), loss_of().item<double>(), 1e-10);
  const double h = 1e-6;
  int checked = 0;
  bool norm_matters = false;
  for (const torch::Tensor* p : {&a->lora_A(), &a->lora_B(), &a->magnitude()}) {
    auto flat = p->view({-1});
    auto grad = p->grad().view({-1});
    for (int64_t i = 0; i < flat.numel(); ++i) {
      const double keep = flat[i].item<double>();
      flat[i] = keep + h;
      const double up = reference(), up_full = loss_of().item<double>();
      flat[i] = keep - h;
      const double down = reference(), down_full = loss_of().item<double>();
      flat[i] = keep;
      EXPECT_NEAR(grad[i].item<double>(), (up - down) / (2 * h), 1e-6) << i;
      if (std::abs((up_full - down_full) / (2 * h) - grad[i].item<double>()) > 1e-4)
        norm_matters = true;  // the undetached function has another gradient
      ++checked;
    }
  }
  EXPECT_EQ(checked, 2 * 7 + 5 * 2 + 5);
  EXPECT_TRUE(norm_matters);
}

TEST(Dora, DropoutFollowsPeft) {
  torch::manual_seed(5);
  auto w = torch::randn({6, 8});
  auto a = make(w, {{"rank", 2}, {"dropout", 0.5}});
  randomize(*a, 3);
  auto x = torch::randn({4, 8});
  auto y = torch::linear(x, w);
  a->eval();
  auto eval_out = a->apply(x, y);
  EXPECT_TRUE(torch::allclose(eval_out, torch::linear(x, w + a->delta_weight()), 1e-5, 1e-5));
  a->train();
  torch::manual_seed(11);
  auto train_out = a->apply(x, y);
  // Same mask by hand: out = y + (f - 1) W h + f s B A h with h = dropout(x).
  torch::manual_seed(11);
  auto h = torch::dropout(x, 0.5, true);
  const double s = 16.0 / 2;
  auto norm = (w + s * torch::mm(a->lora_B(), a->lora_A())).norm(2, {1});
  auto f = a->magnitude() / norm;
  auto expect = y + (f - 1) * torch::linear(h, w) +
                f * torch::linear(torch::linear(h, a->lora_A()), a->lora_B()) * s;
  EXPECT_TRUE(torch::allclose(train_out, expect, 1e-5, 1e-5)) << (train_out - expect).abs().max();
}

TEST(Dora, StateRoundTripAndPeftConfig) {
  torch::manual_seed(6);
  auto w = torch::randn({6, 8});
  auto a = make(w, {{"rank", 2}, {"alpha", 4.0}});
  randomize(*a, 5);
  auto st = a->state();
  ASSERT_EQ(st.tensors.size(), 3u);
  EXPECT_TRUE(st.tensors.count("lora_magnitude_vector"));
  auto b = make(torch::randn({6, 8}), {{"rank", 2}, {"alpha", 4.0}});
  b->load(st);
  auto x = torch::randn({3, 8});
  EXPECT_TRUE(torch::equal(b->magnitude(), a->magnitude()));
  EXPECT_TRUE(torch::equal(b->lora_B(), a->lora_B()));

  auto lora_like = st;
  lora_like.tensors.erase("lora_magnitude_vector");
  lora_like.meta.erase("adapter");
  auto msg = qtune::test::user_error_of([&] { b->load(lora_like); });
  EXPECT_NE(msg.find("missing tensor 'lora_magnitude_vector' (a LoRA adapter, not DoRA?)"),
            std::string::npos)
      << msg;
  auto other_alpha = make(w, {{"rank", 2}, {"alpha", 8.0}});
  msg = qtune::test::user_error_of([&] { other_alpha->load(st); });
  EXPECT_NE(msg.find("saved with alpha 4"), std::string::npos) << msg;

  const Json c = a->peft_config();
  EXPECT_EQ(c["peft_type"], "LORA");
  EXPECT_EQ(c["use_dora"], true);
  EXPECT_EQ(c["r"], 2);
  EXPECT_EQ(c["lora_alpha"], 4);
  msg = qtune::test::user_error_of([] { DoraFactory().create(8, 6, Json{{"rank", 0}}); });
  EXPECT_NE(msg.find("adapter.options.rank must be > 0, got 0"), std::string::npos) << msg;
}
