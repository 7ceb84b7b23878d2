// Unit tests of the LoRA plugin's math, linked against its objects: initialisation, scale,
// forward vs merged delta, dropout, mixed precision gradients, options, state and PEFT config.
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "lora_adapter.h"
#include "qtune/error.h"

using qtune::Json;
using qtune::lora::LoraAdapter;
using qtune::lora::LoraFactory;

namespace {

std::shared_ptr<LoraAdapter> make(int64_t in, int64_t out, const Json& options = Json::object()) {
  auto a = std::dynamic_pointer_cast<LoraAdapter>(LoraFactory().create(in, out, options));
  EXPECT_TRUE(a);
  return a;
}

// B is zero after init; most tests need a non-trivial update.
void randomize_b(LoraAdapter& a) {
  torch::NoGradGuard g;
  const_cast<torch::Tensor&>(a.lora_B()).normal_();
}

std::string create_error(const Json& options) {
  try {
    LoraFactory().create(16, 8, options);
  } catch (const qtune::UserError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Lora, ParametersNamedAsPeftFp32OnCpu) {
  auto a = make(16, 8, {{"rank", 4}});
  std::map<std::string, torch::Tensor> params;
  for (const auto& p : a->named_parameters()) params[p.key()] = p.value();
  ASSERT_EQ(params.size(), 2u);
  ASSERT_TRUE(params.count("lora_A.weight"));
  ASSERT_TRUE(params.count("lora_B.weight"));
  EXPECT_EQ(params["lora_A.weight"].sizes(), (std::vector<int64_t>{4, 16}));
  EXPECT_EQ(params["lora_B.weight"].sizes(), (std::vector<int64_t>{8, 4}));
  for (const auto& [_, t] : params) {
    EXPECT_EQ(t.scalar_type(), torch::kFloat32);
    EXPECT_TRUE(t.device().is_cpu());
    EXPECT_TRUE(t.requires_grad());
  }
}

TEST(Lora, ZeroBInitGivesExactZeroDelta) {
  torch::manual_seed(1);
  auto a = make(32, 24, {{"rank", 4}});
  auto x = torch::randn({3, 5, 32});
  auto y = a->forward(x);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{3, 5, 24}));
  EXPECT_TRUE(torch::equal(y, torch::zeros_like(y)));
  EXPECT_TRUE(torch::equal(a->delta_weight(), torch::zeros({24, 32})));
  // A itself is not zero: kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(in), 1/sqrt(in)).
  const double bound = 1.0 / std::sqrt(32.0);
  EXPECT_GT(a->lora_A().abs().max().item<double>(), 0.5 * bound);
  EXPECT_LE(a->lora_A().abs().max().item<double>(), bound);
}

TEST(Lora, SameGlobalSeedSameInit) {
  torch::manual_seed(7);
  auto a = make(16, 8);
  torch::manual_seed(7);
  auto b = make(16, 8);
  EXPECT_TRUE(torch::equal(a->lora_A(), b->lora_A()));
  auto c = make(16, 8);
  EXPECT_FALSE(torch::equal(a->lora_A(), c->lora_A()));
}

TEST(Lora, DeltaWeightMatchesForward) {
  torch::manual_seed(2);
  auto a = make(20, 12, {{"rank", 3}, {"alpha", 5.0}});
  randomize_b(*a);
  auto x = torch::randn({7, 20});
  auto y = a->forward(x);
  auto w = a->delta_weight();
  EXPECT_EQ(w.sizes(), (std::vector<int64_t>{12, 20}));
  EXPECT_EQ(w.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::allclose(y, torch::matmul(x, w.t()), 1e-5, 1e-5));
  // And explicitly: scale * B @ A with scale = alpha / r.
  EXPECT_TRUE(torch::allclose(w, torch::matmul(a->lora_B(), a->lora_A()) * (5.0 / 3.0)));
}

TEST(Lora, RsloraScaleIsAlphaOverSqrtRank) {
  torch::manual_seed(3);
  auto plain = make(8, 6, {{"rank", 16}, {"alpha", 8.0}});
  auto rs = make(8, 6, {{"rank", 16}, {"alpha", 8.0}, {"use_rslora", true}});
  EXPECT_DOUBLE_EQ(plain->options().scale(), 0.5);
  EXPECT_DOUBLE_EQ(rs->options().scale(), 2.0);
  randomize_b(*rs);
  auto ba = torch::matmul(rs->lora_B(), rs->lora_A());
  EXPECT_TRUE(torch::allclose(rs->delta_weight(), ba * 2.0));
  auto x = torch::randn({4, 8});
  EXPECT_TRUE(torch::allclose(rs->forward(x), torch::matmul(x, ba.t()) * 2.0, 1e-5, 1e-5));
}

TEST(Lora, GaussianInitStatistics) {
  torch::manual_seed(4);
  // PEFT init_lora_weights="gaussian": A ~ N(0, std = 1/r); B = 0.
  auto a = make(4096, 8, {{"rank", 8}, {"init", "gaussian"}});
  const auto A = a->lora_A();
  const double n = static_cast<double>(A.numel());
  const double want_std = 1.0 / 8.0;
  EXPECT_NEAR(A.mean().item<double>(), 0.0, 5.0 * want_std / std::sqrt(n));
  EXPECT_NEAR(A.std().item<double>(), want_std, 0.02 * want_std);
  EXPECT_TRUE(torch::equal(a->lora_B(), torch::zeros_like(a->lora_B())));
  // Kaiming for comparison: U(-b, b) with b = 1/sqrt(in) has std b/sqrt(3).
  auto k = make(4096, 8, {{"rank", 8}});
  const double kaiming_std = 1.0 / std::sqrt(3.0 * 4096);
  EXPECT_NEAR(k->lora_A().std().item<double>(), kaiming_std, 0.02 * kaiming_std);
}

TEST(Lora, DropoutOnlyInTrainMode) {
  torch::manual_seed(5);
  auto a = make(64, 16, {{"rank", 4}, {"dropout", 0.5}});
  randomize_b(*a);
  auto x = torch::randn({32, 64});
  const auto reference = torch::matmul(x, a->delta_weight().t());

  a->train();
  auto y1 = a->forward(x);
  auto y2 = a->forward(x);
  EXPECT_FALSE(torch::allclose(y1, reference, 1e-4, 1e-4));
  EXPECT_FALSE(torch::equal(y1, y2));

  a->eval();
  auto y3 = a->forward(x);
  auto y4 = a->forward(x);
  EXPECT_TRUE(torch::equal(y3, y4));
  EXPECT_TRUE(torch::allclose(y3, reference, 1e-5, 1e-5));
}

TEST(Lora, DisabledReturnsZerosOfRightShapeAndDtype) {
  auto a = make(10, 6, {{"rank", 2}});
  randomize_b(*a);
  a->set_enabled(false);
  auto x = torch::randn({2, 3, 10}).to(torch::kBFloat16);
  auto y = a->forward(x);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 3, 6}));
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(y.abs().sum().item<double>(), 0.0);
  a->set_enabled(true);
  EXPECT_GT(a->forward(x).abs().sum().item<double>(), 0.0);
}

TEST(Lora, Bf16ForwardGivesFp32Grads) {
  torch::manual_seed(6);
  auto a = make(32, 16, {{"rank", 4}});
  randomize_b(*a);
  auto x32 = torch::randn({5, 32});
  auto x = x32.to(torch::kBFloat16);
  auto y = a->forward(x);
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  y.to(torch::kFloat32).pow(2).sum().backward();
  const auto gA = a->lora_A().grad();
  const auto gB = a->lora_B().grad();
  ASSERT_TRUE(gA.defined());
  ASSERT_TRUE(gB.defined());
  EXPECT_EQ(gA.scalar_type(), torch::kFloat32);
  EXPECT_EQ(gB.scalar_type(), torch::kFloat32);
  EXPECT_GT(gA.abs().sum().item<double>(), 0.0);

  // The same gradients in fp32, to bf16 accuracy.
  auto ref = make(32, 16, {{"rank", 4}});
  ref->load(a->state());
  ref->forward(x32).pow(2).sum().backward();
  auto rel = [](const torch::Tensor& g, const torch::Tensor& r) {
    return ((g - r).norm() / r.norm()).item<double>();
  };
  EXPECT_LT(rel(gA, ref->lora_A().grad()), 0.05);
  EXPECT_LT(rel(gB, ref->lora_B().grad()), 0.05);
}

TEST(Lora, BadOptionsNameTheKeyAndValue) {
  auto msg = create_error({{"rank", 0}});
  EXPECT_NE(msg.find("adapter.options.rank"), std::string::npos) << msg;
  EXPECT_NE(msg.find("got 0"), std::string::npos) << msg;
  msg = create_error({{"alpha", -2.5}});
  EXPECT_NE(msg.find("adapter.options.alpha"), std::string::npos) << msg;
  EXPECT_NE(msg.find("-2.5"), std::string::npos) << msg;
  msg = create_error({{"dropout", 1.0}});
  EXPECT_NE(msg.find("adapter.options.dropout"), std::string::npos) << msg;
  EXPECT_NE(msg.find("got 1"), std::string::npos) << msg;
  msg = create_error({{"dropout", -0.1}});
  EXPECT_NE(msg.find("adapter.options.dropout"), std::string::npos) << msg;
  msg = create_error({{"init", "xavier"}});
  EXPECT_NE(msg.find("adapter.options.init"), std::string::npos) << msg;
  EXPECT_NE(msg.find("xavier"), std::string::npos) << msg;
  msg = create_error({{"rank", "8"}});
  EXPECT_NE(msg.find("adapter.options.rank must be an integer"), std::string::npos) << msg;
  msg = create_error({{"seed", 1}});
  EXPECT_NE(msg.find("adapter.options.seed"), std::string::npos) << msg;
  EXPECT_EQ(create_error({{"rank", 1}, {"alpha", 1}, {"dropout", 0.99}, {"init", "gaussian"}}), "");
}

TEST(Lora, SchemaDefaults) {
  const auto resolved = qtune::resolve_options(LoraFactory().option_schema(), nullptr, "x");
  EXPECT_EQ(resolved["rank"], 8);
  EXPECT_DOUBLE_EQ(resolved["alpha"].get<double>(), 16.0);
  EXPECT_DOUBLE_EQ(resolved["dropout"].get<double>(), 0.0);
  EXPECT_EQ(resolved["use_rslora"], false);
  EXPECT_EQ(resolved["init"], "kaiming");
  EXPECT_DOUBLE_EQ(make(4, 4)->options().scale(), 2.0);
}

TEST(Lora, StateLoadRoundTrip) {
  torch::manual_seed(8);
  auto a = make(12, 10, {{"rank", 3}, {"alpha", 6.0}});
  randomize_b(*a);
  auto s = a->state();
  ASSERT_EQ(s.tensors.size(), 2u);
  EXPECT_TRUE(s.tensors.count("lora_A.weight") && s.tensors.count("lora_B.weight"));
  EXPECT_EQ(s.meta["in_features"], 12);
  EXPECT_EQ(s.meta["out_features"], 10);
  EXPECT_EQ(s.meta["options"]["rank"], 3);
  // The state shares storage with the parameters (no copy).
  EXPECT_EQ(s.tensors["lora_A.weight"].data_ptr(), a->lora_A().data_ptr());

  auto b = make(12, 10, {{"rank", 3}, {"alpha", 6.0}});
  EXPECT_FALSE(torch::equal(a->delta_weight(), b->delta_weight()));
  // A bf16 copy (as a PEFT checkpoint may hold) is converted to the fp32 parameters.
  qtune::TensorState half = s;
  half.tensors["lora_B.weight"] = s.tensors["lora_B.weight"].to(torch::kBFloat16);
  b->load(s);
  EXPECT_TRUE(torch::equal(a->delta_weight(), b->delta_weight()));
  EXPECT_EQ(b->lora_B().scalar_type(), torch::kFloat32);
  b->load(half);
  EXPECT_TRUE(torch::allclose(a->lora_B(), b->lora_B(), 1e-2, 1e-2));
}

TEST(Lora, LoadRejectsBadStates) {
  auto a = make(12, 10, {{"rank", 3}});
  auto error_of = [&](const qtune::TensorState& s) -> std::string {
    try {
      a->load(s);
    } catch (const qtune::UserError& e) {
      return e.what();
    }
    return "";
  };
  auto good = make(12, 10, {{"rank", 3}})->state();

  auto missing = good;
  missing.tensors.erase("lora_B.weight");
  auto msg = error_of(missing);
  EXPECT_NE(msg.find("missing tensor 'lora_B.weight'"), std::string::npos) << msg;

  auto wrong_rank = make(12, 10, {{"rank", 4}})->state();
  wrong_rank.meta = Json::object();
  msg = error_of(wrong_rank);
  EXPECT_NE(msg.find("lora_A.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[4, 12]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[3, 12]"), std::string::npos) << msg;

  auto extra = good;
  extra.tensors["lora_A.bias"] = torch::zeros({3});
  msg = error_of(extra);
  EXPECT_NE(msg.find("unexpected tensor 'lora_A.bias'"), std::string::npos) << msg;

  auto other_alpha = make(12, 10, {{"rank", 3}, {"alpha", 32.0}})->state();
  msg = error_of(other_alpha);
  EXPECT_NE(msg.find("alpha 32"), std::string::npos) << msg;

  auto other_kind = good;
  other_kind.meta["adapter"] = "ia3";
  msg = error_of(other_kind);
  EXPECT_NE(msg.find("ia3"), std::string::npos) << msg;
  EXPECT_EQ(error_of(good), "");
}

TEST(Lora, PeftConfigFields) {
  auto c = make(8, 8, {{"rank", 4}, {"alpha", 32.0}, {"dropout", 0.05}})->peft_config();
  EXPECT_EQ(c["peft_type"], "LORA");
  EXPECT_EQ(c["r"], 4);
  EXPECT_TRUE(c["lora_alpha"].is_number_integer());
  EXPECT_EQ(c["lora_alpha"], 32);
  EXPECT_DOUBLE_EQ(c["lora_dropout"].get<double>(), 0.05);
  EXPECT_EQ(c["use_rslora"], false);
  EXPECT_EQ(c["init_lora_weights"], true);
  EXPECT_EQ(c["bias"], "none");
  EXPECT_EQ(c["fan_in_fan_out"], false);
  EXPECT_EQ(c["task_type"], "CAUSAL_LM");

  auto g = make(8, 8, {{"alpha", 2.5}, {"init", "gaussian"}, {"use_rslora", true}})->peft_config();
  EXPECT_EQ(g["init_lora_weights"], "gaussian");
  EXPECT_DOUBLE_EQ(g["lora_alpha"].get<double>(), 2.5);
  EXPECT_EQ(g["use_rslora"], true);
}
