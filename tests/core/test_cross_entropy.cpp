// chunked_cross_entropy against torch's cross_entropy over the full logits: the same loss and
// gradients (of the hidden states and of the head's parameters) with ignored targets, a chunk's
// worth of ignored targets in a row, and no counted target at all; and the head never sees more
// than one chunk of rows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "qtune/cross_entropy.h"

using namespace qtune;
namespace F = torch::nn::functional;

namespace {

struct Problem {
  torch::Tensor hidden, weight, targets;
};

Problem make(int64_t n, int64_t dim, int64_t vocab, torch::ScalarType dtype) {
  torch::manual_seed(11);
  Problem p;
  p.hidden = torch::randn({n, dim}, torch::TensorOptions().dtype(dtype)).requires_grad_(true);
  p.weight = torch::randn({vocab, dim}, torch::TensorOptions().dtype(dtype)).requires_grad_(true);
  p.targets = torch::randint(0, vocab, {n}, torch::kLong);
  for (int64_t i = 0; i < n; i += 3) p.targets[i] = -100;         // scattered ignored targets
  for (int64_t i = 8; i < std::min<int64_t>(n, 20); ++i) p.targets[i] = -100;  // > a chunk in a row
  return p;
}

}  // namespace

TEST(CrossEntropy, ChunkedEqualsFullLogitsLossAndGradients) {
  for (int64_t chunk : {int64_t{1}, int64_t{4}, int64_t{7}, int64_t{1000}}) {
    Problem p = make(41, 8, 13, torch::kFloat32);
    int64_t most_rows = 0;
    auto head = [&](const torch::Tensor& x) {
      most_rows = std::max(most_rows, x.size(0));
      return torch::matmul(x, p.weight.t());
    };
    auto loss = chunked_cross_entropy(p.hidden, p.targets, head, {p.weight}, chunk, torch::kFloat32);
    auto g = torch::autograd::grad({loss}, {p.hidden, p.weight});
    EXPECT_LE(most_rows, chunk) << "chunk " << chunk;

    auto ref = F::cross_entropy(torch::matmul(p.hidden, p.weight.t()), p.targets,
                                F::CrossEntropyFuncOptions().ignore_index(-100));
    auto rg = torch::autograd::grad({ref}, {p.hidden, p.weight});
    EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 1e-6) << "chunk " << chunk;
    EXPECT_LE((g[0] - rg[0]).abs().max().item<double>(), 1e-6) << "grad hidden, chunk " << chunk;
    EXPECT_LE((g[1] - rg[1]).abs().max().item<double>(), 1e-6) << "grad head, chunk " << chunk;
    // Ignored rows get exactly zero gradient.
    EXPECT_EQ(g[0][8].abs().sum().item<double>(), 0.0);
  }
}

TEST(CrossEntropy, Fp64AndLogitsPromotedFromBf16) {
  Problem p = make(30, 8, 13, torch::kFloat64);
  auto head = [&](const torch::Tensor& x) { return torch::matmul(x, p.weight.t()); };
  auto loss = chunked_cross_entropy(p.hidden, p.targets, head, {p.weight}, 4, torch::kFloat64);
  auto ref = F::cross_entropy(head(p.hidden), p.targets);
  EXPECT_EQ(loss.scalar_type(), torch::kFloat64);
  EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 1e-12);

  // A bf16 head: the loss is computed from the bf16 logits promoted to fp32, as the model does.
  Problem b = make(30, 8, 13, torch::kBFloat16);
  auto bhead = [&](const torch::Tensor& x) { return torch::matmul(x, b.weight.t()); };
  auto bl = chunked_cross_entropy(b.hidden, b.targets, bhead, {b.weight}, 4, torch::kFloat32);
  auto bref = F::cross_entropy(bhead(b.hidden).to(torch::kFloat32), b.targets);
  EXPECT_EQ(bl.scalar_type(), torch::kFloat32);
  EXPECT_NEAR(bl.item<double>(), bref.item<double>(), 1e-5);
}

TEST(CrossEntropy, NoCountedTargetIsNanLikeTorch) {
  Problem p = make(10, 4, 5, torch::kFloat32);
  p.targets.fill_(-100);
  auto head = [&](const torch::Tensor& x) { return torch::matmul(x, p.weight.t()); };
  auto loss = chunked_cross_entropy(p.hidden, p.targets, head, {p.weight}, 3, torch::kFloat32);
  auto ref = F::cross_entropy(head(p.hidden), p.targets);
  EXPECT_TRUE(std::isnan(ref.item<double>()));
  EXPECT_TRUE(std::isnan(loss.item<double>()));
  ASSERT_TRUE(loss.requires_grad());  // backward still runs, as with torch's
  loss.backward();
  EXPECT_TRUE(p.weight.grad().defined());
}

TEST(CrossEntropy, ChunkedDropoutHeadReplaysItsMasks) {
  // A head with dropout: the chunks recomputed in backward draw the masks of forward.
  Problem p = make(23, 8, 13, torch::kFloat32);
  auto head = [&](const torch::Tensor& x) {
    return torch::matmul(torch::dropout(x, 0.3, /*train=*/true), p.weight.t());
  };
  torch::manual_seed(5);
  auto loss = chunked_cross_entropy(p.hidden, p.targets, head, {p.weight}, 3, torch::kFloat32);
  auto g = torch::autograd::grad({loss}, {p.hidden, p.weight});
  // The same draws in one pass: rows in order, chunk after chunk, only counted rows.
  torch::manual_seed(5);
  auto rows = p.targets.ne(-100).nonzero().squeeze(1);
  std::vector<torch::Tensor> logits;
  auto h = p.hidden.index_select(0, rows);
  for (int64_t s = 0; s < h.size(0); s += 3) logits.push_back(head(h.narrow(0, s, std::min<int64_t>(3, h.size(0) - s))));
  auto ref = F::cross_entropy(torch::cat(logits), p.targets.index_select(0, rows));
  auto rg = torch::autograd::grad({ref}, {p.hidden, p.weight});
  EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 1e-6);
  EXPECT_LE((g[0] - rg[0]).abs().max().item<double>(), 1e-6);
  EXPECT_LE((g[1] - rg[1]).abs().max().item<double>(), 1e-6);
}
