// QuantizedLinearFunction and the default tiled QuantizedWeight::linear, with an in-test fake
// weight (dense values behind the interface) that records every dequantization. Proves the design
// rule: forward saves only the weight handle (not the input, not a dequantized copy), backward
// gives grad_x = grad_y @ W and nothing else, and the default linear never holds more than one
// tile of W in full precision.
#include <gtest/gtest.h>
#include <malloc.h>

#include "qtune/quantized_linear.h"
#include "qtune/quantized_weight.h"

using qtune::QuantizedLinearFunction;
using qtune::QuantizedWeight;
using qtune::TensorState;

namespace {

// A "quantized" weight that stores W densely and counts what the core asks of it.
class FakeWeight : public QuantizedWeight {
 public:
  explicit FakeWeight(torch::Tensor w, int64_t tile = 0) : w_(std::move(w)), tile_(tile) {}

  std::string backend() const override { return "fake"; }
  int64_t out_features() const override { return w_.size(0); }
  int64_t in_features() const override { return w_.size(1); }

  torch::Tensor dequantize(torch::ScalarType dtype, torch::Device device) const override {
    ++full_calls;
    return track(w_.to(device, dtype, /*non_blocking=*/false, /*copy=*/true));
  }
  torch::Tensor dequantize_rows(int64_t b, int64_t e, torch::ScalarType dtype,
                                torch::Device device) const override {
    ++row_calls;
    max_rows = std::max(max_rows, e - b);
    return track(w_.slice(0, b, e).to(device, dtype, false, true).contiguous());
  }
  TensorState state() const override {
    TensorState s;
    s.tensors["weight.packed"] = w_;
    s.meta = {{"backend", "fake"}, {"shape", {out_features(), in_features()}}, {"options", {}}};
    return s;
  }
  void to(torch::Device device) override { w_.set_data(w_.to(device)); }
  torch::Device device() const override { return w_.device(); }

  /// True while any tensor this weight handed out is still alive somewhere.
  bool any_dequantized_alive() const {
    for (const auto& weak : handed_out)
      if (!weak.expired()) return true;
    return false;
  }

  mutable int full_calls = 0, row_calls = 0;
  mutable int64_t max_rows = 0;
  mutable std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> handed_out;

 protected:
  int64_t tile_rows() const override { return tile_ > 0 ? tile_ : QuantizedWeight::tile_rows(); }

 private:
  torch::Tensor track(torch::Tensor t) const {
    handed_out.push_back(t.storage().getWeakStorageImpl());
    return t;
  }
  torch::Tensor w_;
  int64_t tile_;
};

double rel_error(const torch::Tensor& ref, const torch::Tensor& got) {
  return ((ref.to(torch::kDouble) - got.to(torch::kDouble)).norm() / ref.to(torch::kDouble).norm())
      .item<double>();
}

size_t heap_in_use() {
  const struct mallinfo2 m = mallinfo2();
  return m.uordblks + m.hblkhd;  // heap chunks in use + mmapped chunks
}

}  // namespace

TEST(QuantizedLinearFunction, ForwardSavesNeitherInputNorDequantizedWeight) {
  torch::manual_seed(0);
  // 2048 x 2048 fp32: an 16 MB W, dequantized in 1024-row tiles by the default linear.
  auto w = std::make_shared<FakeWeight>(torch::randn({2048, 2048}), 1024);
  torch::Tensor x0 = torch::randn({64, 2048}, torch::requires_grad());
  torch::Tensor x = x0 * 2.0;  // a non-leaf input, as inside a model (MulBackward keeps no data)
  const auto x_storage = x.storage().getWeakStorageImpl();
  const torch::Tensor x_copy = x.detach().clone();

  {
    // A first product of these shapes may keep GEMM buffers for good (the wheel's MKL in
    // LibTorch 2.x does, ~2 MB): run one and drop it, so the heap below changes by what the
    // graph keeps.
    torch::NoGradGuard no_grad;
    QuantizedLinearFunction::run(x.detach(), w);
  }
  const size_t before = heap_in_use();
  torch::Tensor y = QuantizedLinearFunction::run(x, w);
  const size_t after = heap_in_use();

  // The graph holds no dequantized W: every tile handed out is already freed ...
  EXPECT_GE(w->row_calls, 2);
  EXPECT_EQ(w->full_calls, 0);
  EXPECT_FALSE(w->any_dequantized_alive());
  // ... and the heap grew by the output only (no 16 MB W, no 512 KB input copy).
  const size_t y_bytes = y.numel() * y.element_size();
  EXPECT_LT(after - std::min(after, before), y_bytes + (256u << 10))
      << "forward kept " << (after - before) << " bytes for a " << y_bytes << "-byte output";
  // The input is not saved: dropping our handle frees it although y's graph is alive.
  x = torch::Tensor();
  EXPECT_TRUE(x_storage.expired()) << "QuantizedLinearFunction saved its input";
  ASSERT_TRUE(y.grad_fn());
  EXPECT_NE(y.grad_fn()->name().find("QuantizedLinearFunction"), std::string::npos)
      << y.grad_fn()->name();

  EXPECT_LT(rel_error(torch::matmul(x_copy, w->dequantize(torch::kFloat, torch::kCPU).t()), y),
            1e-5);
  torch::Tensor g = torch::randn_like(y);
  const int rows_before_backward = w->row_calls;
  y.backward(g);
  EXPECT_GT(w->row_calls, rows_before_backward) << "backward dequantizes again (nothing saved)";
  torch::Tensor wd = w->dequantize(torch::kFloat, torch::kCPU);
  EXPECT_LT(rel_error(2.0 * torch::matmul(g, wd), x0.grad()), 1e-5);
  for (const auto& [key, t] : w->state().tensors) {
    EXPECT_FALSE(t.requires_grad()) << key;
    EXPECT_FALSE(t.grad().defined()) << key;
  }
}

TEST(QuantizedLinearFunction, GradientMatchesDenseReferenceAndFiniteDifferences) {
  torch::manual_seed(1);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  torch::Tensor wd = torch::randn({5, 7}, f64);
  auto w = std::make_shared<FakeWeight>(wd, 2);  // 3 tiles for 5 rows
  torch::Tensor x = torch::randn({2, 3, 7}, f64.requires_grad(true));
  torch::Tensor c = torch::randn({2, 3, 5}, f64);

  (QuantizedLinearFunction::run(x, w) * c).sum().backward();
  // Dense reference through ordinary autograd.
  torch::Tensor xr = x.detach().clone().requires_grad_(true);
  (torch::linear(xr, wd) * c).sum().backward();
  EXPECT_LT((x.grad() - xr.grad()).abs().max().item<double>(), 1e-12);

  // Central finite differences of the same loss.
  torch::NoGradGuard no_grad;
  torch::Tensor xf = x.detach().clone();
  const double eps = 1e-6;
  auto loss = [&](const torch::Tensor& in) { return (w->linear(in) * c).sum().item<double>(); };
  auto flat = xf.view({-1});
  auto grad = x.grad().view({-1});
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const double v = flat[i].item<double>();
    flat[i] = v + eps;
    const double lp = loss(xf);
    flat[i] = v - eps;
    const double lm = loss(xf);
    flat[i] = v;
    EXPECT_NEAR((lp - lm) / (2 * eps), grad[i].item<double>(), 1e-7) << i;
  }
}

TEST(QuantizedWeightDefaults, TiledLinearNeverHoldsMoreThanOneTile) {
  torch::manual_seed(2);
  torch::Tensor wd = torch::randn({10, 6});
  for (auto dt : {torch::kFloat, torch::kBFloat16}) {
    FakeWeight w(wd, 3);  // tiles of 3 rows: 3 + 3 + 3 + 1
    torch::Tensor x = torch::randn({4, 2, 6}).to(dt);
    torch::Tensor y = w.linear(x);
    ASSERT_EQ(y.sizes(), torch::IntArrayRef({4, 2, 10}));
    EXPECT_EQ(y.scalar_type(), dt);
    const double tol = dt == torch::kFloat ? 1e-6 : 1e-2;
    EXPECT_LT(rel_error(torch::matmul(x.to(torch::kFloat), wd.t()), y), tol);
    torch::Tensor g = torch::randn({4, 2, 10}).to(dt);
    torch::Tensor gx = w.linear_grad_input(g);
    ASSERT_EQ(gx.sizes(), torch::IntArrayRef({4, 2, 6}));
    EXPECT_LT(rel_error(torch::matmul(g.to(torch::kFloat), wd), gx), tol);
    EXPECT_EQ(w.full_calls, 0);
    EXPECT_EQ(w.row_calls, 8);
    EXPECT_EQ(w.max_rows, 3);
  }
  // A weight that fits one tile is dequantized once, whole.
  FakeWeight small(wd, 64);
  EXPECT_LT(
      rel_error(torch::matmul(torch::ones({1, 6}), wd.t()), small.linear(torch::ones({1, 6}))),
      1e-6);
  EXPECT_EQ(small.full_calls + small.row_calls, 1);
  // The default dequantize_rows is a slice of dequantize.
  struct NoRows : FakeWeight {
    using FakeWeight::FakeWeight;
    torch::Tensor dequantize_rows(int64_t b, int64_t e, torch::ScalarType dt,
                                  torch::Device dev) const override {
      return QuantizedWeight::dequantize_rows(b, e, dt, dev);
    }
  } plain(wd, 4);
  EXPECT_TRUE(plain.dequantize_rows(2, 5, torch::kFloat, torch::kCPU).equal(wd.slice(0, 2, 5)));
}

TEST(QuantizedLinearModule, PackedTensorsAreBuffersNotParameters) {
  auto w = std::make_shared<FakeWeight>(torch::randn({4, 3}));
  qtune::QuantizedLinear m(w);
  EXPECT_TRUE(m->parameters().empty());
  const auto buffers = m->named_buffers();
  ASSERT_EQ(buffers.size(), 1u);
  EXPECT_TRUE(buffers.contains("weight_packed"));
  torch::Tensor x = torch::randn({2, 3}, torch::requires_grad());
  torch::Tensor y = m->forward(x);
  y.sum().backward();
  EXPECT_TRUE(x.grad().defined());
  EXPECT_FALSE(buffers["weight_packed"].grad().defined());
  // Module::to reaches the weight's own tensors (same TensorImpl).
  m->to(torch::kDouble);
  EXPECT_EQ(w->state().tensors.at("weight.packed").scalar_type(), torch::kDouble);
}
