// QLoRA memory at scale: on a synthetic Llama config of >100M parameters, the NF4 base's linear
// weights are at most 4.127/32 of the fp32 ones and 4.127/16 of the bf16 ones, and the quantized
// model never holds a dequantized copy of a weight between forward and backward.
#include <malloc.h>

#include <gtest/gtest.h>

#include "qtune/model.h"
#include "qtune/process.h"
#include "qtune/registry.h"
#include "test_util.h"

using namespace qtune;

namespace {

using qtune::test::plugins;

// ~110M parameters: a 12-layer, 768-wide Llama (GPT-2-small sized) with a 32000 vocabulary.
ModelConfig config_110m() {
  ModelConfig c;
  c.hidden_size = 768;
  c.intermediate_size = 2048;
  c.num_hidden_layers = 12;
  c.num_attention_heads = 12;
  c.num_key_value_heads = 12;
  c.vocab_size = 32000;
  c.max_position_embeddings = 512;
  return c;
}

TuningSpec qlora_spec() {
  return TuningSpec::for_training(TrainType::kQlora, torch::kFloat32, plugins(), "nf4", {}, false,
                                  "lora", {}, {"all-linear"});
}

int64_t dense_linear_params(const ModelConfig& c) {
  const int64_t d = c.hidden_size, kv = c.num_key_value_heads * c.head_dim();
  const int64_t per_layer = 2 * d * d + 2 * kv * d + 3 * d * c.intermediate_size;
  return per_layer * c.num_hidden_layers + c.vocab_size * d;  // + untied head
}

}  // namespace

TEST(QloraMemory, Nf4LinearBytesAt110M) {
  const auto c = config_110m();
  ASSERT_GE(c.num_parameters(), 100'000'000);
  auto w = random_weights(c, 1);
  LlamaForCausalLM model(c, *w, qlora_spec());
  const double q = static_cast<double>(model->linear_weight_bytes());
  const double fp32 = 4.0 * static_cast<double>(dense_linear_params(c));
  EXPECT_LE(q / fp32, 0.13) << "bits per parameter " << 8 * q / (fp32 / 4);
  EXPECT_LE(q / (fp32 / 2), 0.26);
}

TEST(QloraMemory, NoDequantizedCopySurvivesForward) {
  // One 4096x4096 quantized projection: its fp32 copy would be 64 MB. After a forward with
  // autograd recording, the heap and core's block cache must hold far less than that beyond the
  // activations.
  TuningSpec s = qlora_spec();
  auto q = s.base.quant->quantize(torch::randn({4096, 4096}), s.base.quant_options);
  LinearSlot slot(std::shared_ptr<QuantizedWeight>(std::move(q)));
  auto x = torch::randn({4, 4096}, torch::requires_grad());
  auto live = [] {  // bytes in use: glibc's heap and mappings, and the cache's blocks in use
    const auto m = mallinfo2();
    const auto c = cpu_block_cache_stats();
    return static_cast<double>(m.uordblks + m.hblkhd) +
           static_cast<double>(c.mapped_bytes - c.cached_bytes);
  };
  malloc_trim(0);
  const double before = live();
  auto y = slot->forward(x);
  const double held = live() - before;
  EXPECT_LT(held, 8e6) << "bytes still allocated after forward: " << held;
  y.sum().backward();
  EXPECT_TRUE(x.grad().defined());
}
