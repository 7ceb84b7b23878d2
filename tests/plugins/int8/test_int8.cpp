// Unit tests of the int8 backend (linked from int8_objects): options, exact round trips on the
// grid, per-row and grouped scales, zero rows, bf16 scales, the matmul overrides against
// x @ dequantize()^T, state round trips and error bounds.
#include <gtest/gtest.h>

#include <cstdio>
#include <functional>

#include "int8_backend.h"
#include "qtune/error.h"
#include "qtune/quantized_linear.h"

using qtune::Json;
using namespace qtune::int8;

namespace {

std::unique_ptr<qtune::QuantizedWeight> quant(const torch::Tensor& w, const Json& opts = {}) {
  return Int8Backend().quantize(w, opts);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const qtune::UserError& e) {
    return e.what();
  }
  return "";
}

double rel_error(const torch::Tensor& w, const torch::Tensor& r) {
  return ((w - r).norm() / w.norm()).item<double>();
}

// W = k * s with integer k in [-127, 127] and, in every row/group, one |k| = 127 so that
// absmax / 127 is exactly s (a power of two).
torch::Tensor on_grid(int64_t out, int64_t in, int64_t group, torch::Tensor* scales) {
  torch::manual_seed(out * 31 + in);
  const int64_t gsz = group > 0 ? group : in, groups = (in + gsz - 1) / gsz;
  torch::Tensor k = torch::randint(-127, 128, {out, in}).to(torch::kFloat32);
  *scales = torch::empty({out, groups});
  for (int64_t r = 0; r < out; ++r)
    for (int64_t j = 0; j < groups; ++j) {
      k[r][j * gsz] = (r + j) % 2 ? 127 : -127;
      (*scales)[r][j] = std::ldexp(1.0, -static_cast<int>((r + 3 * j) % 9) - 2);
    }
  return k * scales->repeat_interleave(gsz, 1).slice(1, 0, in);
}

}  // namespace

TEST(Int8Options, DefaultsAndErrors) {
  const Int8Params p = parse_params(Json::object());
  EXPECT_EQ(p.group_size, 0);
  EXPECT_EQ(p.scale_dtype, "fp32");
  EXPECT_EQ(Int8Backend().name(), "int8");
  const torch::Tensor w = torch::randn({4, 32});
  EXPECT_NE(error_of([&] {
              quant(w, {{"group_size", -1}});
            }).find("quant.options.group_size must be an integer in [0, 1073741824], got -1"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              quant(w, {{"scale_dtype", "fp16"}});
            }).find("quant.options.scale_dtype must be one of \"fp32\", \"bf16\", got \"fp16\""),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              quant(w, {{"bits", 8}});
            }).find("unknown option quant.options.bits"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              quant(w, {{"group_size", 1.5}});
            }).find("must be an integer"),
            std::string::npos);
  EXPECT_NE(error_of([&] { quant(torch::randn({8}), {}); }).find("2-D matrix [out, in], got a 1-D tensor [8]"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              quant(torch::ones({2, 2}, torch::kInt64), {});
            }).find("floating point"),
            std::string::npos);
  torch::Tensor bad = torch::randn({4, 8});
  bad[2][1] = INFINITY;
  EXPECT_NE(error_of([&] { quant(bad, {}); }).find("NaN or Inf"), std::string::npos);
}

TEST(Int8Quantize, ExactOnTheGridPerRowAndGrouped) {
  for (int64_t group : {0, 16, 7}) {
    torch::Tensor scales;
    const torch::Tensor w = on_grid(12, 40, group, &scales);  // 40 % 16 and 40 % 7 != 0
    auto q = quant(w, {{"group_size", group}});
    const qtune::TensorState st = q->state();
    EXPECT_TRUE(torch::equal(st.tensors.at("weight.scale"), scales)) << group;
    EXPECT_EQ(st.tensors.at("weight").scalar_type(), torch::kInt8);
    EXPECT_TRUE(torch::equal(q->dequantize(torch::kFloat32, torch::kCPU), w)) << group;
    EXPECT_TRUE(torch::equal(q->dequantize(torch::kFloat64, torch::kCPU), w.to(torch::kFloat64)));
    for (int64_t r : {0, 5, 11})
      EXPECT_TRUE(torch::equal(q->dequantize_rows(r, r + 1, torch::kFloat32, torch::kCPU),
                               w.slice(0, r, r + 1)));
  }
}

TEST(Int8Quantize, ScalesAreAbsmaxOver127AndCodesRound) {
  const torch::Tensor w = torch::tensor({{0.5f, -1.0f, 0.26f, 0.0f}, {3.0f, 2.0f, -1.0f, 1.5f}});
  auto q = quant(w);
  const qtune::TensorState st = q->state();
  const torch::Tensor s = st.tensors.at("weight.scale");
  EXPECT_FLOAT_EQ(s[0][0].item<float>(), 1.0f / 127);
  EXPECT_FLOAT_EQ(s[1][0].item<float>(), 3.0f / 127);
  const torch::Tensor expect =
      torch::tensor({{64, -127, 33, 0}, {127, 85, -42, 64}}, torch::kInt32).to(torch::kInt8);
  EXPECT_TRUE(torch::equal(st.tensors.at("weight"), expect)) << st.tensors.at("weight");
}

TEST(Int8Quantize, ZeroRowsAndGroups) {
  torch::Tensor w = torch::randn({6, 64});
  w[1].zero_();
  w[4].slice(0, 16, 32).zero_();
  for (int64_t group : {0, 16}) {
    for (const char* sd : {"fp32", "bf16"}) {
      auto q = quant(w, {{"group_size", group}, {"scale_dtype", sd}});
      const torch::Tensor r = q->dequantize(torch::kFloat32, torch::kCPU);
      EXPECT_FALSE(torch::isnan(r).any().item<bool>());
      EXPECT_TRUE(torch::equal(r[1], torch::zeros({64})));
      EXPECT_TRUE(torch::equal(r[4].slice(0, 16, 32), torch::zeros({16})));
      EXPECT_EQ(q->state().tensors.at("weight.scale")[1][0].item<float>(), 0.0f);
      const torch::Tensor x = torch::randn({3, 64});
      EXPECT_FALSE(torch::isnan(q->linear(x)).any().item<bool>());
      EXPECT_TRUE(torch::equal(q->linear(x).select(1, 1), torch::zeros({3})));
    }
  }
  auto all_zero = quant(torch::zeros({3, 5}));
  EXPECT_TRUE(
      torch::equal(all_zero->dequantize(torch::kFloat32, torch::kCPU), torch::zeros({3, 5})));
}

TEST(Int8Quantize, Bf16ScalesAndGroupsReduceError) {
  torch::manual_seed(3);
  const torch::Tensor w = torch::randn({256, 512}) * 0.02;
  auto fp32 = quant(w);
  auto bf16 = quant(w, {{"scale_dtype", "bf16"}});
  auto grouped = quant(w, {{"group_size", 64}});
  EXPECT_EQ(bf16->state().tensors.at("weight.scale").scalar_type(), torch::kBFloat16);
  const double e32 = rel_error(w, fp32->dequantize(torch::kFloat32, torch::kCPU));
  const double e16 = rel_error(w, bf16->dequantize(torch::kFloat32, torch::kCPU));
  const double eg = rel_error(w, grouped->dequantize(torch::kFloat32, torch::kCPU));
  EXPECT_LT(e16, e32 * 1.02);
  EXPECT_LT(eg, e32 * 0.9);
  // Bytes held: int8 codes plus the scales.
  EXPECT_EQ(fp32->nbytes(), 256 * 512 + 256 * 4);
  EXPECT_EQ(bf16->nbytes(), 256 * 512 + 256 * 2);
  EXPECT_EQ(grouped->nbytes(), 256 * 512 + 256 * 8 * 4);
}

TEST(Int8Linear, OverridesMatchDequantizedMatmul) {
  torch::manual_seed(5);
  // in = 8192 makes tile_rows() 256, so out = 600 takes three row tiles.
  const torch::Tensor w = torch::randn({600, 8192}) * 0.05;
  for (const Json& o : {Json{{"group_size", 0}}, Json{{"group_size", 0}, {"scale_dtype", "bf16"}},
                        Json{{"group_size", 128}}}) {
    auto q = quant(w, o);
    const torch::Tensor d = q->dequantize(torch::kFloat32, torch::kCPU);
    const torch::Tensor x = torch::randn({2, 3, 8192});
    const torch::Tensor g = torch::randn({2, 3, 600});
    EXPECT_TRUE(torch::allclose(q->linear(x), torch::matmul(x, d.t()), 1e-4, 1e-4)) << o.dump();
    EXPECT_TRUE(torch::allclose(q->linear_grad_input(g), torch::matmul(g, d), 1e-4, 1e-4))
        << o.dump();
    // bf16 compute (CPU LibTorch has no fp16 matmul; fp16 takes the default dequantize path).
    for (auto dt : {torch::kBFloat16}) {
      const torch::Tensor xh = x.to(dt), gh = g.to(dt);
      const torch::Tensor y = q->linear(xh), gx = q->linear_grad_input(gh);
      EXPECT_EQ(y.scalar_type(), dt);
      EXPECT_EQ(gx.scalar_type(), dt);
      EXPECT_LT(rel_error(torch::matmul(xh.to(torch::kFloat32), d.t()), y.to(torch::kFloat32)),
                0.02);
      EXPECT_LT(rel_error(torch::matmul(gh.to(torch::kFloat32), d), gx.to(torch::kFloat32)), 0.02);
    }
  }
}

TEST(Int8Linear, AutogradThroughQuantizedLinear) {
  torch::manual_seed(8);
  const torch::Tensor w = torch::randn({48, 32});
  std::shared_ptr<qtune::QuantizedWeight> q = quant(w);
  const torch::Tensor d = q->dequantize(torch::kFloat32, torch::kCPU);
  const torch::Tensor x = torch::randn({4, 32}, torch::requires_grad());
  const torch::Tensor y = qtune::QuantizedLinearFunction::run(x, q);
  EXPECT_TRUE(torch::allclose(y, torch::matmul(x, d.t()), 1e-5, 1e-5));
  const torch::Tensor up = torch::randn({4, 48});
  (y * up).sum().backward();
  EXPECT_TRUE(torch::allclose(x.grad(), torch::matmul(up, d), 1e-5, 1e-5));
}

TEST(Int8State, RoundTripAndLoadErrors) {
  torch::manual_seed(9);
  const torch::Tensor w = torch::randn({10, 37});
  for (const Json& o : {Json::object(), Json{{"group_size", 8}, {"scale_dtype", "bf16"}}}) {
    auto q = quant(w, o);
    const qtune::TensorState st = q->state();
    EXPECT_EQ(st.meta["backend"], "int8");
    EXPECT_EQ(st.meta["shape"], Json({10, 37}));
    qtune::TensorState copy;
    copy.meta = Json::parse(st.meta.dump());
    for (const auto& [k, t] : st.tensors) copy.tensors[k] = t.clone();
    auto back = Int8Backend().load(copy);
    for (const auto& [k, t] : back->state().tensors)
      EXPECT_TRUE(torch::equal(t, st.tensors.at(k))) << k;
    EXPECT_TRUE(torch::equal(back->dequantize(torch::kFloat32, torch::kCPU),
                             q->dequantize(torch::kFloat32, torch::kCPU)));
    EXPECT_LT(rel_error(w, q->dequantize(torch::kFloat32, torch::kCPU)),
              Int8Backend().error_bound(o));
  }
  const qtune::TensorState good = quant(w, {{"group_size", 8}})->state();
  auto load_err = [&](const std::function<void(qtune::TensorState&)>& edit) {
    qtune::TensorState st = good;
    edit(st);
    return error_of([&] { Int8Backend().load(st); });
  };
  EXPECT_EQ(load_err([](auto&) {}), "");
  EXPECT_NE(load_err([](auto& s) {
              s.tensors.erase("weight.scale");
            }).find("tensor \"weight.scale\" is missing"),
            std::string::npos);
  EXPECT_NE(load_err([](auto& s) {
              s.tensors["weight"] = s.tensors["weight"].to(torch::kUInt8);
            }).find("tensor \"weight\" must be Char, got Byte"),
            std::string::npos);
  EXPECT_NE(load_err([](auto& s) { s.meta["options"]["group_size"] = 0; })
                .find("tensor \"weight.scale\" must have shape [10, 1] for shape [10, 37] and "
                      "options {\"group_size\":0,\"scale_dtype\":\"fp32\"}, got [10, 5]"),
            std::string::npos);
  EXPECT_NE(load_err([](auto& s) {
              s.tensors["SCB"] = torch::zeros({10});
            }).find("unexpected tensor \"SCB\""),
            std::string::npos);
  EXPECT_NE(
      load_err([](auto& s) { s.meta["backend"] = "hqq"; }).find("meta.backend must be \"int8\""),
      std::string::npos);
  EXPECT_NE(load_err([](auto& s) {
              s.meta.erase("format_version");
            }).find("format_version must be 1, got nothing"),
            std::string::npos);
  EXPECT_NE(load_err([](auto& s) {
              s.meta["options"]["scale_dtype"] = "fp8";
            }).find("int8 state meta.options.scale_dtype must be one of"),
            std::string::npos);
}

TEST(Int8ErrorBound, HoldsOnGaussianAndIsNotLoose) {
  torch::manual_seed(10);
  const torch::Tensor w = torch::randn({512, 1024});
  for (const Json& o : {Json::object(), Json{{"group_size", 64}},
                        Json{{"group_size", 128}, {"scale_dtype", "bf16"}}}) {
    const double bound = Int8Backend().error_bound(o);
    const double err = rel_error(w, quant(w, o)->dequantize(torch::kFloat32, torch::kCPU));
    EXPECT_LT(err, bound) << o.dump();
    EXPECT_GT(err, bound / 2) << o.dump() << " " << err << " vs " << bound;
  }
}
