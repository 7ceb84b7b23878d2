// causal_attention (FlashAttention's tiled algorithm) against the attention it replaces: the
// materialized softmax(q k^T / sqrt(d) + mask) v with repeated key/value heads. Outputs and
// gradients agree for multi-head and grouped-query attention, tiles that do not divide the
// sequence, queries continuing a KV cache, and packed segments (block-diagonal causal masks).
#include <gtest/gtest.h>

#include <cmath>

#include "qtune/attention.h"
#include "qtune/error.h"

using namespace qtune;

namespace {

// The reference: the full [T, S] matrix, as the model computed attention before.
torch::Tensor reference(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& segments, int64_t q_offset) {
  const int64_t groups = q.size(1) / k.size(1), T = q.size(2), S = k.size(2);
  auto kk = k.repeat_interleave(groups, 1), vv = v.repeat_interleave(groups, 1);
  auto scores = torch::matmul(q, kk.transpose(-2, -1)) / std::sqrt(static_cast<double>(q.size(3)));
  auto qi = torch::arange(q_offset, q_offset + T, torch::kLong).unsqueeze(1);
  auto kj = torch::arange(S, torch::kLong).unsqueeze(0);
  auto allowed = (kj <= qi).view({1, 1, T, S});
  if (segments.defined())
    allowed = allowed & (segments.unsqueeze(2) == segments.unsqueeze(1)).unsqueeze(1);
  scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  return torch::matmul(torch::softmax(scores, -1), vv);
}

struct Case {
  int64_t B, H, KV, T, S, D, q_offset, block;
  bool segments;
};

// Runs both on the same inputs and upstream gradient; returns the largest differences of the
// output and of each input gradient.
std::vector<double> compare(const Case& c, torch::ScalarType dtype, uint64_t seed) {
  torch::manual_seed(seed);
  auto opts = torch::TensorOptions().dtype(dtype);
  auto q = torch::randn({c.B, c.H, c.T, c.D}, opts).requires_grad_(true);
  auto k = torch::randn({c.B, c.KV, c.S, c.D}, opts).requires_grad_(true);
  auto v = torch::randn({c.B, c.KV, c.S, c.D}, opts).requires_grad_(true);
  auto dy = torch::randn({c.B, c.H, c.T, c.D}, opts);
  torch::Tensor seg;
  if (c.segments) {
    // Runs of random lengths (1..6) per row: segment boundaries fall inside and between tiles.
    seg = torch::empty({c.B, c.S}, torch::kLong);
    for (int64_t b = 0; b < c.B; ++b) {
      int64_t id = 0, left = 0;
      for (int64_t t = 0; t < c.S; ++t) {
        if (left == 0) {
          left = torch::randint(1, 7, {1}).item<int64_t>();
          id += 1 + torch::randint(0, 3, {1}).item<int64_t>();  // ids need not be consecutive
        }
        seg[b][t] = id;
        --left;
      }
    }
  }
  auto y = causal_attention(q, k, v, seg, c.q_offset, c.block);
  auto grads = torch::autograd::grad({y}, {q, k, v}, {dy});
  auto qd = q.detach().to(torch::kFloat64).requires_grad_(true);
  auto kd = k.detach().to(torch::kFloat64).requires_grad_(true);
  auto vd = v.detach().to(torch::kFloat64).requires_grad_(true);
  auto r = reference(qd, kd, vd, seg, c.q_offset);
  auto rgrads = torch::autograd::grad({r}, {qd, kd, vd}, {dy.to(torch::kFloat64)});
  EXPECT_EQ(y.scalar_type(), dtype);
  EXPECT_EQ(y.sizes(), r.sizes());
  std::vector<double> diffs{(y.to(torch::kFloat64) - r).abs().max().item<double>()};
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(grads[i].scalar_type(), dtype);
    diffs.push_back((grads[i].to(torch::kFloat64) - rgrads[i]).abs().max().item<double>());
  }
  return diffs;
}

void expect_close(const Case& c, torch::ScalarType dtype, double tol, const std::string& what) {
  const auto d = compare(c, dtype, 1234);
  const char* names[] = {"output", "grad q", "grad k", "grad v"};
  for (size_t i = 0; i < d.size(); ++i) EXPECT_LE(d[i], tol) << what << ": " << names[i];
}

}  // namespace

TEST(Attention, MatchesTheMaterializedSoftmaxInFp32) {
  // T = 13 with tiles of 4: a partial last tile, tiles on and off the diagonal.
  expect_close({2, 4, 4, 13, 13, 8, 0, 4, false}, torch::kFloat32, 2e-6, "multi-head");
  expect_close({2, 6, 2, 13, 13, 8, 0, 4, false}, torch::kFloat32, 2e-6, "grouped-query");
  expect_close({1, 4, 1, 9, 9, 16, 0, 128, false}, torch::kFloat32, 2e-6, "one tile");
}

TEST(Attention, MatchesInFp64ToRounding) {
  expect_close({2, 4, 2, 21, 21, 8, 0, 5, false}, torch::kFloat64, 1e-12, "fp64");
  expect_close({2, 4, 2, 21, 21, 8, 0, 5, true}, torch::kFloat64, 1e-12, "fp64 segments");
}

TEST(Attention, SegmentsMaskAttentionBlockDiagonally) {
  expect_close({3, 4, 2, 29, 29, 8, 0, 4, true}, torch::kFloat32, 2e-6, "segments, tiles of 4");
  expect_close({3, 4, 2, 29, 29, 8, 0, 64, true}, torch::kFloat32, 2e-6, "segments, one tile");
}

TEST(Attention, QueriesContinuingACache) {
  // 3 new queries after 10 cached positions; and a single decoding step.
  expect_close({2, 4, 2, 3, 13, 8, 10, 4, false}, torch::kFloat32, 2e-6, "3 after 10");
  expect_close({2, 4, 2, 1, 13, 8, 12, 4, false}, torch::kFloat32, 2e-6, "1 after 12");
}

TEST(Attention, Bf16StaysWithinBf16Rounding) {
  // bf16 inputs, fp32 statistics: the error is that of rounding the results to bf16.
  expect_close({2, 4, 2, 33, 33, 16, 0, 8, true}, torch::kBFloat16, 3e-2, "bf16");
}

TEST(Attention, ASegmentSeesNothingOfAnother) {
  // Changing the keys and values of one segment leaves every other segment's output unchanged.
  torch::manual_seed(3);
  auto q = torch::randn({1, 2, 10, 4}), k = torch::randn({1, 2, 10, 4}), v = torch::randn({1, 2, 10, 4});
  auto seg = torch::tensor({0, 0, 0, 0, 1, 1, 1, 2, 2, 2}, torch::kLong).unsqueeze(0);
  auto y = causal_attention(q, k, v, seg, 0, 3);
  auto k2 = k.clone(), v2 = v.clone();
  k2.narrow(2, 4, 3).normal_();
  v2.narrow(2, 4, 3).normal_();
  auto y2 = causal_attention(q, k2, v2, seg, 0, 3);
  EXPECT_TRUE(torch::equal(y.narrow(2, 0, 4), y2.narrow(2, 0, 4)));
  EXPECT_TRUE(torch::equal(y.narrow(2, 7, 3), y2.narrow(2, 7, 3)));
  EXPECT_FALSE(torch::allclose(y.narrow(2, 4, 3), y2.narrow(2, 4, 3)));
  // The first token of a segment sees only itself: its output is its own value.
  EXPECT_TRUE(torch::allclose(y.select(2, 4), v.select(2, 4), 1e-6, 1e-6));
}

TEST(Attention, BadShapesAreNamed) {
  auto q = torch::randn({1, 3, 4, 8}), k = torch::randn({1, 2, 4, 8});
  EXPECT_THROW(causal_attention(q, k, k), UserError);  // 3 query heads over 2 kv heads
  auto q4 = torch::randn({1, 4, 4, 8});
  try {
    causal_attention(q4, k, k, torch::zeros({1, 5}, torch::kLong));
    FAIL() << "expected an error";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("segments must be int64 [1, 4]"), std::string::npos)
        << e.what();
  }
}

TEST(Attention, InferenceWithoutGradMatchesTheReference) {
  // Without autograd the forward runs directly: one plain softmax for at most a tile of queries
  // (a decoding step against a long cache), the tiled forward otherwise.
  torch::manual_seed(21);
  auto q = torch::randn({2, 4, 19, 8}), k = torch::randn({2, 2, 19, 8}), v = torch::randn({2, 2, 19, 8});
  auto seg = torch::tensor({0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2}, torch::kLong)
                 .unsqueeze(0)
                 .repeat({2, 1});
  torch::NoGradGuard no_grad;
  for (int64_t block : {int64_t{4}, int64_t{128}}) {
    for (bool with_seg : {false, true}) {
      const auto s = with_seg ? seg : torch::Tensor();
      auto y = causal_attention(q, k, v, s, 0, block);
      EXPECT_LE((y - reference(q, k, v, s, 0)).abs().max().item<double>(), 2e-6)
          << "block " << block << " segments " << with_seg;
    }
    // one query after 18 cached positions
    auto y = causal_attention(q.narrow(2, 18, 1), k, v, {}, 18, block);
    EXPECT_LE((y - reference(q.narrow(2, 18, 1), k, v, {}, 18)).abs().max().item<double>(), 2e-6);
  }
}
