// Packed sequences in the model API: LlamaForCausalLM::forward/loss with per-token RoPE positions
// and segment ids compute, for each example packed into a row, what the model computes for that
// example alone (logits, loss and gradients), with and without activation checkpointing; the
// defaults change nothing; bad layouts are named.
#include <gtest/gtest.h>

#include "qtune/error.h"
#include "qtune/model.h"
#include "qtune/registry.h"
#include "test_util.h"

using namespace qtune;

namespace {

using qtune::test::plugins;
using qtune::test::tiny_config;

using qtune::test::lora_spec;

// Row 0 packs examples of lengths 5, 4 and 3; row 1 one example of 9 and a padding run of 3
// (its own segment, targets ignored).
struct Packed {
  torch::Tensor tokens, targets, positions, segments;
  std::vector<std::pair<int64_t, std::pair<int64_t, int64_t>>> examples;  // row, [start, len)
};

Packed make_packed(int64_t vocab) {
  torch::manual_seed(8);
  Packed p;
  p.tokens = torch::randint(0, vocab, {2, 12}, torch::kLong);
  p.targets = torch::randint(0, vocab, {2, 12}, torch::kLong);
  p.positions = torch::empty({2, 12}, torch::kLong);
  p.segments = torch::empty({2, 12}, torch::kLong);
  p.examples = {{0, {0, 5}}, {0, {5, 4}}, {0, {9, 3}}, {1, {0, 9}}, {1, {9, 3}}};
  int64_t id = 0;
  for (const auto& [row, span] : p.examples) {
    for (int64_t i = 0; i < span.second; ++i) {
      p.positions[row][span.first + i] = i;
      p.segments[row][span.first + i] = id;
    }
    ++id;
  }
  p.targets[1].narrow(0, 9, 3).fill_(-100);  // padding
  p.targets[0][6] = -100;
  return p;
}

}  // namespace

TEST(Packing, DefaultPositionsAndOneSegmentChangeNothing) {
  auto c = tiny_config();
  auto w = random_weights(c, 4);
  LlamaForCausalLM model(c, *w, lora_spec());
  torch::NoGradGuard no_grad;
  auto tokens = torch::randint(0, c.vocab_size, {2, 10}, torch::kLong);
  auto plain = model->forward(tokens);
  auto positions = torch::arange(10, torch::kLong).unsqueeze(0).repeat({2, 1});
  auto segments = torch::full({2, 10}, 7, torch::kLong);
  EXPECT_TRUE(torch::equal(plain, model->forward(tokens, nullptr, positions)));
  EXPECT_TRUE(torch::allclose(plain, model->forward(tokens, nullptr, positions, segments), 1e-6, 1e-6));
}

TEST(Packing, EachPackedExampleComputesWhatItComputesAlone) {
  for (bool ckpt : {false, true}) {
    auto c = tiny_config();
    auto w = random_weights(c, 9);
    torch::manual_seed(1);
    LlamaForCausalLM model(c, *w, lora_spec());
    model->set_activation_checkpointing(ckpt);
    {
      // B != 0, so that every adapter parameter has a gradient to compare.
      torch::NoGradGuard no_grad;
      for (auto& [name, t] : model->trainable_parameters())
        if (name.find("lora_B") != std::string::npos) t.normal_(0, 0.1);
    }
    const Packed p = make_packed(c.vocab_size);

    auto logits = model->forward(p.tokens, nullptr, p.positions, p.segments);
    model->zero_grad();
    auto [loss, count] = model->loss(p.tokens, p.targets, p.positions, p.segments);
    loss.backward();
    std::vector<torch::Tensor> packed_grads;
    for (auto& [_, t] : model->trainable_parameters()) packed_grads.push_back(t.grad().clone());

    // Alone: each example as its own batch of one; the packed loss is the token-weighted mean.
    model->zero_grad();
    int64_t total = 0;
    torch::Tensor weighted;
    for (const auto& [row, span] : p.examples) {
      auto tok = p.tokens[row].narrow(0, span.first, span.second).unsqueeze(0);
      auto tgt = p.targets[row].narrow(0, span.first, span.second).unsqueeze(0);
      auto alone = model->forward(tok);
      auto packed_part = logits[row].narrow(0, span.first, span.second).unsqueeze(0);
      EXPECT_TRUE(torch::allclose(alone, packed_part, 1e-5, 1e-5))
          << "row " << row << " start " << span.first << " ckpt " << ckpt << ": "
          << (alone - packed_part).abs().max();
      auto [l, n] = model->loss(tok, tgt);
      if (n == 0) continue;
      total += n;
      auto part = l * static_cast<double>(n);
      weighted = weighted.defined() ? weighted + part : part;
    }
    ASSERT_EQ(total, count);
    auto expected = weighted / static_cast<double>(total);
    EXPECT_NEAR(loss.item<double>(), expected.item<double>(), 1e-6) << "ckpt " << ckpt;
    expected.backward();
    size_t i = 0;
    for (auto& [name, t] : model->trainable_parameters()) {
      EXPECT_LE((t.grad() - packed_grads[i]).abs().max().item<double>(), 1e-6)
          << name << " ckpt " << ckpt;
      ++i;
    }
  }
}

TEST(Packing, BadLayoutsAreNamed) {
  auto c = tiny_config();
  auto w = random_weights(c, 4);
  TuningSpec spec;
  LlamaForCausalLM model(c, *w, spec);
  auto tokens = torch::randint(0, c.vocab_size, {2, 6}, torch::kLong);
  auto expect_error = [&](const std::function<void()>& f, const std::string& needle) {
    try {
      f();
      FAIL() << "expected an error mentioning " << needle;
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error([&] { model->forward(tokens, nullptr, torch::zeros({2, 5}, torch::kLong)); },
               "positions must be int64 [batch, time] like the tokens [2, 6]");
  expect_error([&] { model->forward(tokens, nullptr, {}, torch::zeros({2, 6})); },
               "segments must be int64");
  expect_error([&] { model->forward(tokens, nullptr, torch::full({2, 6}, -1, torch::kLong)); },
               "positions must be >= 0");
  auto cache = model->new_cache(2, 8);
  expect_error([&] { model->forward(tokens, &cache, {}, torch::zeros({2, 6}, torch::kLong)); },
               "cannot be used with a KV cache");
}
