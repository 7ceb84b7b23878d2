// The example backend (examples/quant-plugin, loaded from the in-tree test build of it) against
// its documented format and an independent scalar reference: nibble order, offset codes,
// round-half-to-even, per-group scales, and its measured error against its declared bound.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "qtune/error.h"
#include "qtune/registry.h"
#include "test_util.h"

namespace {

std::shared_ptr<qtune::QuantBackend> int4() {
  static std::shared_ptr<qtune::QuantBackend> backend = [] {
    static qtune::Registry registry;  // static: plugins outlive the objects they make
    registry.load_library(
        (std::filesystem::path(QTUNE_SDK_TEST_PLUGIN_DIR) / "libqtune_int4.so").string());
    return registry.quant("int4");
  }();
  return backend;
}

// Scalar reference of the documented scheme: W[out, in] -> (codes q in [-7, 7], fp32 scales).
struct Reference {
  std::vector<int> q;         // [out * in]
  std::vector<float> scales;  // [out * G]
};

Reference reference_quantize(const torch::Tensor& w, int64_t group) {
  const int64_t out = w.size(0), in = w.size(1), g = group > 0 ? group : in;
  const int64_t groups = (in + g - 1) / g;
  const torch::Tensor wc = w.contiguous();
  auto a = wc.accessor<float, 2>();
  Reference r{std::vector<int>(out * in), std::vector<float>(out * groups)};
  for (int64_t i = 0; i < out; ++i)
    for (int64_t k = 0; k < groups; ++k) {
      float absmax = 0;
      for (int64_t j = k * g; j < std::min(in, (k + 1) * g); ++j)
        absmax = std::max(absmax, std::fabs(a[i][j]));
      const float s = absmax / 7.0f;
      r.scales[i * groups + k] = s;
      for (int64_t j = k * g; j < std::min(in, (k + 1) * g); ++j) {
        const float v = s > 0 ? a[i][j] / s : 0.0f;
        r.q[i * in + j] = static_cast<int>(std::clamp(std::nearbyint(v), -7.0f, 7.0f));
      }
    }
  return r;
}

}  // namespace

TEST(Int4Example, PacksTwoOffsetCodesPerByteLowNibbleFirst) {
  // One row, one group: scale 0.7 / 7 = 0.1; -0.35 / 0.1 = -3.5 rounds half to even -> -4.
  torch::Tensor w = torch::tensor({{0.7f, -0.35f, 0.1f, 0.0f, -0.7f}});
  auto q = int4()->quantize(w, qtune::Json::object());
  const qtune::TensorState s = q->state();
  ASSERT_EQ(s.tensors.size(), 2u);
  const torch::Tensor packed = s.tensors.at("weight");
  ASSERT_EQ(packed.scalar_type(), torch::kUInt8);
  ASSERT_EQ(packed.sizes(), torch::IntArrayRef({1, 3}));
  // codes 7, -4, 1, 0, -7 -> stored 15, 4, 9, 8, 1, and 8 (zero) pads the odd row.
  EXPECT_EQ(packed[0][0].item<int>(), 15 | 4 << 4);
  EXPECT_EQ(packed[0][1].item<int>(), 9 | 8 << 4);
  EXPECT_EQ(packed[0][2].item<int>(), 1 | 8 << 4);
  const torch::Tensor scale = s.tensors.at("weight.scale");
  ASSERT_EQ(scale.scalar_type(), torch::kFloat);
  EXPECT_FLOAT_EQ(scale.item<float>(), 0.7f / 7.0f);
  EXPECT_EQ(s.meta, qtune::Json::parse(R"({"backend": "int4", "format_version": 1,
      "shape": [1, 5], "options": {"group_size": 64}})"));
  const torch::Tensor d = q->dequantize(torch::kFloat, torch::kCPU);
  EXPECT_TRUE(d.allclose(torch::tensor({{0.7f, -0.4f, 0.1f, 0.0f, -0.7f}})));
}

TEST(Int4Example, MatchesTheScalarReference) {
  torch::manual_seed(7);
  for (int64_t group : {0, 16, 64, 100}) {
    SCOPED_TRACE(group);
    torch::Tensor w = torch::randn({37, 203});
    w[3].zero_();  // an all-zero row: scale 0, codes 0
    auto q = int4()->quantize(w, {{"group_size", group}});
    const Reference ref = reference_quantize(w, group);
    const torch::Tensor scale = q->state().tensors.at("weight.scale").contiguous();
    ASSERT_EQ(scale.numel(), static_cast<int64_t>(ref.scales.size()));
    const torch::Tensor want_scale =
        torch::from_blob(const_cast<float*>(ref.scales.data()), scale.sizes()).clone();
    EXPECT_TRUE(scale.equal(want_scale));
    // Dequantized = q * scale, per element.
    const int64_t g = group > 0 ? group : 203, groups = scale.size(1);
    torch::Tensor want = torch::empty({37, 203});
    auto wa = want.accessor<float, 2>();
    auto sa = want_scale.accessor<float, 2>();
    for (int64_t i = 0; i < 37; ++i)
      for (int64_t j = 0; j < 203; ++j)
        wa[i][j] = static_cast<float>(ref.q[i * 203 + j]) * sa[i][std::min(j / g, groups - 1)];
    EXPECT_TRUE(q->dequantize(torch::kFloat, torch::kCPU).equal(want));
  }
}

TEST(Int4Example, ErrorIsWithinItsBoundAndTheBoundIsNotVacuous) {
  torch::manual_seed(3);
  const torch::Tensor w = torch::randn({256, 512});
  for (int64_t group : {32, 64, 128}) {
    const qtune::Json options = {{"group_size", group}};
    const double bound = int4()->error_bound(options);
    const torch::Tensor d = int4()->quantize(w, options)->dequantize(torch::kFloat, torch::kCPU);
    const double err = ((w - d).norm() / w.norm()).item<double>();
    std::printf("int4 group_size %3lld: relative error %.4f, bound %.4f\n",
                static_cast<long long>(group), err, bound);
    EXPECT_LE(err, bound) << group;
    EXPECT_GE(err, 0.6 * bound) << "the bound for group_size " << group << " is too loose";
  }
}

TEST(Int4Example, RejectsBadInputNamingIt) {
  auto message = [](const std::function<void()>& f) -> std::string {
    try {
      f();
    } catch (const qtune::UserError& e) {
      return e.what();
    }
    return "<accepted>";
  };
  EXPECT_NE(message([] {
              int4()->quantize(torch::randn({4, 8}), {{"group_size", -1}});
            }).find("quant.options.group_size must be an integer in [0, 1073741824], got -1"),
            std::string::npos);
  torch::Tensor nan = torch::randn({4, 8});
  nan[2][5] = NAN;
  EXPECT_NE(message([&] { int4()->quantize(nan, qtune::Json::object()); }).find("NaN"),
            std::string::npos);
  auto q = int4()->quantize(torch::randn({4, 9}), qtune::Json::object());
  qtune::TensorState s = q->state();
  s.tensors["weight"] = s.tensors["weight"].slice(1, 0, 4);
  EXPECT_NE(message([&] { int4()->load(s); }).find("\"weight\" must have shape [4, 5]"),
            std::string::npos);
  s = q->state();
  s.meta["format_version"] = 2;
  EXPECT_NE(message([&] { int4()->load(s); }).find("meta.format_version must be 1, got 2"),
            std::string::npos);
  s = q->state();
  s.tensors.erase("weight.scale");
  EXPECT_NE(message([&] { int4()->load(s); }).find("\"weight.scale\" is missing"),
            std::string::npos);
}
