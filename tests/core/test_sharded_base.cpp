// The sharded base's mechanics in one process (a group of one: the shard is the whole weight,
// the gathers are copies): for every backend, a model whose decoder layers live in BaseShards
// computes bit for bit what the unsharded model computes (forward, backward, with and without
// activation checkpointing); a gathered weight is rebuilt byte for byte; at most two weights are
// ever gathered, and none after release_all; the order is learned so the next weight is
// gathered ahead; a backend whose load is not cheap is refused. Two real ranks: tests/dist.
#include <gtest/gtest.h>

#include <functional>

#include "qtune/model.h"
#include "qtune/process_group.h"
#include "qtune/registry.h"
#include "qtune/sharded_base.h"
#include "test_util.h"

using namespace qtune;

namespace {

using qtune::test::plugins;
using qtune::test::tiny_config;

TuningSpec qlora_all_linear(const std::string& quant) {
  return TuningSpec::for_training(TrainType::kQlora, torch::kFloat32, plugins(), quant, {}, false,
                                  "lora", Json{{"rank", 4}, {"dropout", 0.0}},
                                  {"all-linear"});
}

// Losses and adapter gradients of two forward/backward passes.
struct Trace {
  std::vector<double> losses;
  std::vector<torch::Tensor> grads;
};

// `after_first`, when given, runs between the passes.
Trace train_twice(LlamaForCausalLM& model, const torch::Tensor& tokens,
                  const std::function<void()>& after_first = nullptr) {
  Trace t;
  for (int pass = 0; pass < 2; ++pass) {
    model->zero_grad();
    auto loss = model->loss(tokens, tokens).first;
    loss.backward();
    t.losses.push_back(loss.item<double>());
    if (auto& shards = model->spec().base.shards) shards->release_all();
    if (pass == 0 && after_first) after_first();
  }
  for (auto& [_, p] : model->trainable_parameters()) t.grads.push_back(p.grad().clone());
  return t;
}

}  // namespace

TEST(ShardedBase, EveryBackendComputesWhatTheWholeBaseComputes) {
  auto c = tiny_config(64);
  c.num_hidden_layers = 3;
  auto w = random_weights(c, 11);
  auto tokens = torch::randint(0, c.vocab_size, {2, 12}, torch::kLong);
  for (const std::string quant : {"nf4", "hqq", "int8"}) {
    for (bool ckpt : {false, true}) {
      SCOPED_TRACE(quant + (ckpt ? " checkpointing" : ""));
      torch::manual_seed(3);
      LlamaForCausalLM whole(c, *w, qlora_all_linear(quant));
      whole->set_activation_checkpointing(ckpt);
      auto spec = qlora_all_linear(quant);
      auto shards = std::make_shared<BaseShards>(ProcessGroup::single(), spec.base.quant);
      spec.base.shards = shards;
      torch::manual_seed(3);
      LlamaForCausalLM sharded(c, *w, spec);
      sharded->set_activation_checkpointing(ckpt);

      // Byte for byte the same weights and embedding once gathered; the head is sharded too.
      EXPECT_TRUE(sharded->model->embed_tokens->sharded());
      EXPECT_EQ(sharded->model->embed_tokens->weight.scalar_type(), torch::kUInt8);
      {
        torch::NoGradGuard no_grad;
        auto ids = torch::arange(c.vocab_size, torch::kLong).view({1, -1});
        EXPECT_TRUE(torch::equal(whole->model->embed_tokens->forward(ids),
                                 sharded->model->embed_tokens->forward(ids)));
      }
      const auto& a = whole->slots();
      const auto& b = sharded->slots();
      ASSERT_EQ(a.size(), b.size());
      for (size_t i = 0; i < a.size(); ++i) {
        auto qa = a[i].second->quantized(), qb = b[i].second->quantized();
        ASSERT_TRUE(qa && qb) << a[i].first;
        EXPECT_EQ(qb->state().tensors.count("shard"), 1u) << a[i].first;
        EXPECT_TRUE(torch::equal(qa->dequantize(torch::kFloat32, torch::kCPU),
                                 qb->dequantize(torch::kFloat32, torch::kCPU)))
            << a[i].first;
      }
      shards->release_all();
      EXPECT_EQ(shards->gathered_bytes(), 0);

      int64_t gathers1 = 0, hits1 = 0;
      const auto after_first = [&] {
        gathers1 = shards->gathers();
        hits1 = shards->prefetch_hits();
      };
      const Trace ta = train_twice(whole, tokens), tb = train_twice(sharded, tokens, after_first);
      ASSERT_EQ(ta.losses, tb.losses);
      ASSERT_EQ(ta.grads.size(), tb.grads.size());
      for (size_t i = 0; i < ta.grads.size(); ++i)
        EXPECT_TRUE(torch::equal(ta.grads[i], tb.grads[i])) << "gradient " << i;

      // Never more than the weight in use and the one gathered ahead (a layer is 7 weights);
      // nothing after release.
      EXPECT_GT(shards->max_weight_bytes(), 0);
      EXPECT_LE(shards->peak_gathered_bytes(), 2 * shards->max_weight_bytes());
      EXPECT_EQ(shards->gathered_bytes(), 0);
      // The held bytes are the shards: here one rank's share is the whole, padded, plus the
      // code tables a backend shares process-wide and leaves out of nbytes (nf4: 1.1 KB).
      EXPECT_GE(shards->shard_bytes(), shards->full_bytes());
      const int64_t weights = 7 * c.num_hidden_layers + 2;  // projections, embedding, head
      EXPECT_LE(shards->shard_bytes(), shards->full_bytes() + 2048 * weights);
      // The second pass knew the order: every gather but its first (the embedding: nothing runs
      // before it) was started ahead and used — forward, recompute and backward told apart (layer 0's q, k
      // and v need no input gradient). The embedding and head are gathered once each: the loss's
      // backward finds the head gathered.
      const int64_t gathers2 = shards->gathers() - gathers1,
                    hits2 = shards->prefetch_hits() - hits1;
      EXPECT_GE(gathers2, 7 * c.num_hidden_layers + 2);
      EXPECT_LE(gathers2, (ckpt ? 3 : 2) * 7 * c.num_hidden_layers + 2);
      EXPECT_EQ(hits2, gathers2 - 1) << shards->stats().dump();
    }
  }
}

TEST(ShardedBase, ALayerSkippedOrRepeatedIsGatheredOnDemand) {
  // Forward only, then backward twice in another order: wrong guesses are waited for and
  // dropped, and the results stay those of the whole base.
  auto c = tiny_config(64);
  c.num_hidden_layers = 4;
  auto w = random_weights(c, 2);
  auto spec = qlora_all_linear("nf4");
  auto shards = std::make_shared<BaseShards>(ProcessGroup::single(), spec.base.quant);
  spec.base.shards = shards;
  LlamaForCausalLM sharded(c, *w, spec);
  LlamaForCausalLM whole(c, *w, qlora_all_linear("nf4"));
  auto tokens = torch::randint(0, c.vocab_size, {1, 6}, torch::kLong);
  for (int i = 0; i < 3; ++i) {
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(torch::equal(sharded->forward(tokens), whole->forward(tokens)));
    // Layers out of order, one at a time, as generation with a cache never does.
    for (int64_t l : {3, 1, 1, 0, 2}) {
      auto q = sharded->slots()[7 * l].second->quantized();
      auto r = whole->slots()[7 * l].second->quantized();
      EXPECT_TRUE(torch::equal(q->dequantize(torch::kFloat32, torch::kCPU),
                               r->dequantize(torch::kFloat32, torch::kCPU)));
      EXPECT_LE(shards->gathered_bytes(), 2 * shards->max_weight_bytes());
    }
  }
  shards->release_all();
  EXPECT_EQ(shards->gathered_bytes(), 0);
}

namespace {

// A backend that declares its load expensive (nf4 underneath).
class ExpensiveLoad : public QuantBackend {
 public:
  explicit ExpensiveLoad(std::shared_ptr<QuantBackend> inner) : inner_(std::move(inner)) {}
  std::string name() const override { return "slowload"; }
  std::vector<OptionSpec> option_schema() const override { return inner_->option_schema(); }
  double error_bound(const Json& o) const override { return inner_->error_bound(o); }
  std::unique_ptr<QuantizedWeight> quantize(const torch::Tensor& w, const Json& o) const override {
    return inner_->quantize(w, o);
  }
  std::unique_ptr<QuantizedWeight> load(const TensorState& s) const override {
    return inner_->load(s);
  }
  bool load_is_cheap() const override { return false; }

 private:
  std::shared_ptr<QuantBackend> inner_;
};

}  // namespace

TEST(ShardedBase, ABackendWhoseLoadIsNotCheapIsRefused) {
  auto nf4 = qlora_all_linear("nf4").base.quant;
  EXPECT_TRUE(nf4->load_is_cheap());
  const std::string msg = qtune::test::user_error_of([&] {
    BaseShards(ProcessGroup::single(), std::make_shared<ExpensiveLoad>(nf4));
  });
  qtune::test::expect_contains(msg, "dist.shard_base");
  qtune::test::expect_contains(msg, "'slowload'");
  qtune::test::expect_contains(msg, "not cheap");
}

TEST(ShardedBase, DecoderLayerOfAPath) {
  EXPECT_EQ(decoder_layer_of("model.layers.0.self_attn.q_proj.weight"), 0);
  EXPECT_EQ(decoder_layer_of("model.layers.31.mlp.down_proj"), 31);
  EXPECT_EQ(decoder_layer_of("lm_head.weight"), -1);
  EXPECT_EQ(decoder_layer_of("model.layers.x.mlp"), -1);
  EXPECT_EQ(decoder_layer_of("model.layers.7"), -1);
  EXPECT_EQ(decoder_layer_of("model.embed_tokens.weight"), -1);
}
