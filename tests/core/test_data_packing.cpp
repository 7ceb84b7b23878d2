// Packing without cross-talk, through the data pipeline and the model: a packed batch of the
// shared Alpaca sample (stories260K, tok512, fp32) gives every record the loss it has alone and
// the same gradients as the records one by one, under full, lora and qlora and with activation
// checkpointing; without the segment mask the losses differ.
#include <gtest/gtest.h>

#include "qtune/data.h"
#include "qtune/model.h"
#include "qtune/model_files.h"
#include "qtune/registry.h"
#include "qtune/tokenizer.h"
#include "test_util.h"

using namespace qtune;

namespace {

namespace F = torch::nn::functional;

TuningSpec spec_for(TrainType type) {
  return TuningSpec::for_training(type, torch::kFloat32, test::plugins(), "nf4", {}, false, "lora",
                                  Json{{"rank", 4}}, {"all-linear"});
}

struct Splits {
  std::shared_ptr<TokenDataset> plain, packed;
};

Splits alpaca_splits(const Tokenizer& tok) {
  DataConfig c;
  c.path = test::data_path("alpaca_sample102.json");
  c.seq_len = 512;  // stories260K's context; most records of the sample are 150-300 tok512 ids
  Splits s;
  s.plain = load_data(c, tok).train;
  c.pack = true;
  s.packed = load_data(c, tok).train;
  return s;
}

// Sum of the cross-entropy terms of each segment of row 0 (segment id -> sum, count).
std::vector<std::pair<torch::Tensor, int64_t>> segment_losses(const torch::Tensor& logits,
                                                              const Batch& b) {
  std::vector<std::pair<torch::Tensor, int64_t>> out;
  const int64_t segments = b.segments.max().item<int64_t>();
  for (int64_t s = 1; s <= segments; ++s) {
    const auto mask = b.segments[0].eq(s).logical_and(b.targets[0].ne(kIgnoreIndex));
    const auto idx = mask.nonzero().squeeze(1);
    out.emplace_back(F::cross_entropy(logits[0].index_select(0, idx),
                                      b.targets[0].index_select(0, idx),
                                      F::CrossEntropyFuncOptions().reduction(torch::kSum)),
                     idx.numel());
  }
  return out;
}

std::vector<torch::Tensor> grads(LlamaForCausalLMImpl& m) {
  std::vector<torch::Tensor> g;
  for (auto& [_, p] : m.trainable_parameters()) {
    g.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
    p.mutable_grad() = torch::Tensor();
  }
  return g;
}

}  // namespace

TEST(DataPacking, PackedBatchEqualsRecordsOneByOne) {
  auto tok = load_tokenizer(test::data_path("tok512.bin"));
  const Splits d = alpaca_splits(*tok);
  ASSERT_TRUE(d.packed->packed());
  // Packed example i holds the next k records of the plain dataset, in order; take the first
  // one that holds several (records whose neighbour does not fit are alone in theirs).
  int64_t example = 0, first = 0, k = 0;
  for (; example < d.packed->size(); ++example) {
    k = make_batch(*d.packed, {example}).segments.max().item<int64_t>();
    if (k >= 2) break;
    first += k;
  }
  ASSERT_GE(k, 2) << "no example of seq_len 512 holds several Alpaca records";
  const Batch packed = make_batch(*d.packed, {example});

  ModelFiles files = open_model(test::data_path("stories260K.bin"));
  for (TrainType type : {TrainType::kFull, TrainType::kLora, TrainType::kQlora}) {
    for (bool checkpointing : {false, true}) {
      SCOPED_TRACE(std::string(to_string(type)) + (checkpointing ? " checkpointed" : ""));
      torch::manual_seed(3);
      LlamaForCausalLM model(files.config, *files.weights, spec_for(type));
      model->set_activation_checkpointing(checkpointing);
      model->train();

      // Packed: one forward over the row, the per-record sums read off by segment.
      auto logits = model->forward(packed.tokens, nullptr, packed.positions, packed.segments);
      const auto per_segment = segment_losses(logits, packed);
      ASSERT_EQ(static_cast<int64_t>(per_segment.size()), k);
      torch::Tensor total = torch::zeros({}, torch::kFloat32);
      for (const auto& [sum, n] : per_segment) total = total + sum;
      const int64_t count = packed.num_targets;
      (total / count).backward();
      const auto g_packed = grads(*model);
      // The model's own loss on the packed batch is the same mean.
      const auto [mean, n] = model->loss(packed.tokens, packed.targets, packed.positions,
                                         packed.segments);
      EXPECT_EQ(n, count);
      EXPECT_NEAR(mean.item<double>(), (total / count).item<double>(), 1e-5);
      model->zero_grad();

      // One by one: each record alone, unpacked.
      torch::Tensor alone_total = torch::zeros({}, torch::kFloat32);
      int64_t alone_count = 0;
      for (int64_t i = 0; i < k; ++i) {
        const Batch b = make_batch(*d.plain, {first + i});
        auto l = model->forward(b.tokens);
        const auto sum = F::cross_entropy(l[0], b.targets[0],
                                          F::CrossEntropyFuncOptions()
                                              .ignore_index(kIgnoreIndex)
                                              .reduction(torch::kSum));
        EXPECT_EQ(b.num_targets, per_segment[i].second) << "record " << i;
        EXPECT_NEAR(sum.item<double>() / b.num_targets,
                    per_segment[i].first.item<double>() / per_segment[i].second, 1e-5)
            << "record " << i;
        alone_total = alone_total + sum;
        alone_count += b.num_targets;
      }
      ASSERT_EQ(alone_count, count);
      (alone_total / count).backward();
      const auto g_alone = grads(*model);
      ASSERT_EQ(g_packed.size(), g_alone.size());
      double worst = 0, scale = 0;
      for (size_t p = 0; p < g_packed.size(); ++p) {
        worst = std::max(worst, (g_packed[p] - g_alone[p]).abs().max().item<double>());
        scale = std::max(scale, g_alone[p].abs().max().item<double>());
      }
      EXPECT_GT(scale, 1e-4);  // gradients that say something
      EXPECT_LE(worst, 1e-5 * std::max(1.0, scale)) << "max |grad| " << scale;

      // Without the mask the records see each other. (Dropping only the restarting positions
      // would change nothing measurable: RoPE scores depend on relative positions alone.)
      torch::NoGradGuard no_grad;
      const auto leaked =
          segment_losses(model->forward(packed.tokens, nullptr, packed.positions, {}), packed);
      double diff = 0;
      for (int64_t i = 1; i < k; ++i)
        diff = std::max(diff, std::abs(leaked[i].first.item<double>() / leaked[i].second -
                                       per_segment[i].first.item<double>() / per_segment[i].second));
      EXPECT_GT(diff, 1e-3) << "no segment mask";
    }
  }
}
