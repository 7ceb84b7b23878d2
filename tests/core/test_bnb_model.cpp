// bitsandbytes 4-bit directories both ways: what save_bnb_model writes has transformers' config
// and key layout, its packed bytes are the nf4 backend's, and it loads back into the qlora model
// quantizing on the fly would build; a directory laid out by hand as transformers saves one
// (float quant storage, tied head, no skip list) loads too; everything else is refused by name.
#include <gtest/gtest.h>

#include <fstream>

#include "qtune/bnb_model.h"
#include "qtune/error.h"
#include "qtune/files.h"
#include "qtune/model.h"
#include "qtune/model_files.h"
#include "qtune/registry.h"
#include "qtune/safetensors.h"
#include "test_util.h"

using namespace qtune;

namespace {

using qtune::test::plugins;

ModelConfig config(bool tied) {
  ModelConfig c = test::tiny_config(64, tied);
  c.intermediate_size = 128;
  c.vocab_size = 96;
  return c;
}

// Random weights already representable in bf16, so bf16 storage of the dense tensors is exact.
class Bf16Weights : public WeightSource {
 public:
  explicit Bf16Weights(const ModelConfig& c) : src_(random_weights(c, 17)) {}
  std::string describe() const override { return "bf16 random weights"; }
  bool has(const std::string& n) const override { return src_->has(n); }
  std::vector<int64_t> shape(const std::string& n) const override { return src_->shape(n); }
  torch::Tensor get(const std::string& n, torch::ScalarType dtype) const override {
    return src_->get(n, torch::kBFloat16).to(dtype);
  }
  std::vector<std::string> names() const override { return src_->names(); }

 private:
  std::unique_ptr<WeightSource> src_;
};

TuningSpec qlora_spec(std::vector<std::string> skip = {}, bool skip_output = false) {
  return TuningSpec::for_training(TrainType::kQlora, torch::kFloat32, plugins(), "nf4", {},
                                  skip_output, "lora", {}, {"q", "v", "down"}, skip);
}

void write_config(const std::string& dir, const Json& j) {
  std::ofstream(dir + "/config.json") << j.dump(2);
}

}  // namespace

TEST(BnbModel, WriteReadBackBytesAndLogits) {
  const ModelConfig c = config(false);
  Bf16Weights w(c);
  const auto spec = qlora_spec();
  const std::string dir = test::temp_dir("bnb");
  const std::vector<std::string> skip = {"layers.1.mlp.down_proj"};
  save_bnb_model(dir, c, w, *spec.base.quant, spec.base.quant_options, skip, torch::kBFloat16);

  const Json cfg = read_json_file(dir + "/config.json");
  const Json& qc = cfg.at("quantization_config");
  EXPECT_EQ(qc["quant_method"], "bitsandbytes");
  EXPECT_EQ(qc["load_in_4bit"], true);
  EXPECT_EQ(qc["bnb_4bit_quant_type"], "nf4");
  EXPECT_EQ(qc["bnb_4bit_use_double_quant"], true);
  EXPECT_EQ(qc["bnb_4bit_compute_dtype"], "bfloat16");
  EXPECT_EQ(qc["bnb_4bit_quant_storage"], "uint8");
  EXPECT_EQ(qc["llm_int8_skip_modules"], Json::array({"model.layers.1.mlp.down_proj", "lm_head"}));

  // transformers' key layout, and the nf4 backend's bytes for each packed projection.
  auto st = SafetensorsFile::open(dir + "/model.safetensors");
  const std::string p = "model.layers.0.self_attn.q_proj.";
  for (const char* key : {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                          "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}) {
    ASSERT_TRUE(st->has(p + key)) << key;
  }
  EXPECT_EQ(st->info("lm_head.weight").dtype, "BF16");
  EXPECT_EQ(st->info("model.layers.1.mlp.down_proj.weight").dtype, "BF16");
  EXPECT_FALSE(st->has("model.layers.1.mlp.down_proj.weight.absmax"));
  auto expected = spec.base.quant->quantize(w.get(p + "weight", torch::kFloat32), spec.base.quant_options);
  for (const auto& [key, t] : expected->state().tensors)
    EXPECT_TRUE(torch::equal(st->tensor(p + key), t.cpu())) << key;

  ModelFiles f = open_model(dir);
  EXPECT_TRUE(f.weights->has_quantized(p + "weight"));
  EXPECT_FALSE(f.weights->has(p + "weight"));
  EXPECT_FALSE(f.weights->has(p + "weight.absmax"));
  EXPECT_EQ(f.weights->shape(p + "weight"), (std::vector<int64_t>{64, 64}));
  EXPECT_TRUE(f.weights->has("model.layers.1.mlp.down_proj.weight"));

  // Loaded as is (no requantizing), the skipped module and the head dense: the same model as
  // quantizing the original weights on the fly with the same modules kept dense.
  torch::manual_seed(3);
  LlamaForCausalLM from_dir(f.config, *f.weights, qlora_spec());
  torch::manual_seed(3);
  LlamaForCausalLM on_the_fly(c, w, qlora_spec(skip, /*skip_output=*/true));
  EXPECT_EQ(from_dir->slots()[13].first, "model.layers.1.mlp.down_proj");
  EXPECT_EQ(from_dir->slots()[13].second->kind(), LinearSlotImpl::Kind::kFrozenDense);
  EXPECT_EQ(from_dir->lm_head->kind(), LinearSlotImpl::Kind::kFrozenDense);
  EXPECT_EQ(from_dir->linear_weight_bytes(), on_the_fly->linear_weight_bytes());
  torch::NoGradGuard no_grad;
  auto tokens = torch::randint(0, c.vocab_size, {2, 7}, torch::kLong);
  EXPECT_TRUE(torch::equal(from_dir->forward(tokens), on_the_fly->forward(tokens)));
}

TEST(BnbModel, ReadsTheLayoutTransformersSaves) {
  // By hand: tied embeddings (no lm_head tensor), packed codes stored as bfloat16 elements
  // (bnb_4bit_quant_storage), no skip list, no double quantization, Qwen2 biases dense.
  ModelConfig c = config(true);
  c.model_type = "qwen2";
  c.qkv_bias = true;
  Bf16Weights w(c);
  auto nf4 = plugins().quant("nf4");
  const Json opts =
      resolve_options(nf4->option_schema(), Json{{"double_quant", false}}, "quant.options");
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [name, shape] : llama_weight_shapes(c)) {
    if (shape.size() == 2 && name != "model.embed_tokens.weight") {
      auto q = nf4->quantize(w.get(name, torch::kFloat32), opts);
      const std::string m = name.substr(0, name.size() - 7);
      for (const auto& [key, t] : q->state().tensors)
        tensors[m + "." + key] =
            key == "weight" ? t.contiguous().reshape({-1}).view(torch::kBFloat16).reshape({-1, 1}) : t;
    } else {
      tensors[name] = w.get(name, torch::kBFloat16);
    }
  }
  const std::string dir = test::temp_dir("bnb-hand");
  write_safetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}});
  Json cfg = c.to_hf_json();
  cfg["torch_dtype"] = "bfloat16";
  cfg["quantization_config"] = Json::parse(R"({
    "_load_in_4bit": true, "_load_in_8bit": false, "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_quant_storage": "bfloat16", "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": false, "llm_int8_enable_fp32_cpu_offload": false,
    "llm_int8_has_fp16_weight": false, "llm_int8_skip_modules": null, "llm_int8_threshold": 6.0,
    "load_in_4bit": true, "load_in_8bit": false, "quant_method": "bitsandbytes"})");
  write_config(dir, cfg);

  ModelFiles f = open_model(dir);
  EXPECT_TRUE(f.weights->has("model.layers.0.self_attn.k_proj.bias"));
  torch::manual_seed(4);
  LlamaForCausalLM from_dir(f.config, *f.weights, qlora_spec());
  auto spec = qlora_spec({}, /*skip_output=*/true);
  spec.base.quant_options = opts;
  torch::manual_seed(4);
  LlamaForCausalLM on_the_fly(c, w, spec);
  EXPECT_EQ(from_dir->lm_head->kind(), LinearSlotImpl::Kind::kFrozenDense);  // tied: shared
  torch::NoGradGuard no_grad;
  auto tokens = torch::randint(0, c.vocab_size, {2, 7}, torch::kLong);
  EXPECT_TRUE(torch::equal(from_dir->forward(tokens), on_the_fly->forward(tokens)));

  // What is not bitsandbytes NF4 4-bit is refused, naming the key.
  auto refused = [&](const Json& patch) {
    Json bad = cfg;
    bad["quantization_config"].merge_patch(patch);
    write_config(dir, bad);
    return test::user_error_of([&] { open_model(dir); });
  };
  test::expect_contains(refused({{"bnb_4bit_quant_type", "fp4"}}),
                        "quantization_config.bnb_4bit_quant_type = \"fp4\" is not supported");
  test::expect_contains(refused({{"load_in_8bit", true}, {"load_in_4bit", false}}),
                        "quantization_config.load_in_8bit = true: 8-bit bitsandbytes (LLM.int8)");
  test::expect_contains(refused({{"bnb_4bit_quant_storage", "int4"}}),
                        "bnb_4bit_quant_storage = \"int4\"");
  test::expect_contains(refused({{"quant_method", "gptq"}}),
                        "quantization_config with quant_method \"gptq\" "
                        "is not supported");
  // A double-quantization flag that the tensors contradict is a corrupt file, said so when read.
  write_config(dir, [&] {
    Json bad = cfg;
    bad["quantization_config"]["bnb_4bit_use_double_quant"] = true;
    return bad;
  }());
  ModelFiles g = open_model(dir);
  test::expect_contains(
      test::user_error_of([&] { g.weights->quantized("model.layers.0.self_attn.q_proj.weight"); }),
      "has no weight.nested_absmax but quantization_config.bnb_4bit_use_double_quant is "
      "true");
  write_config(dir, cfg);
  // A backend whose state is not bitsandbytes' cannot write this format.
  auto hqq = plugins().quant("hqq");
  test::expect_contains(test::user_error_of([&] {
                          save_bnb_model(test::temp_dir("bnb-hqq"), c, w, *hqq,
                                         resolve_options(hqq->option_schema(), Json::object(), "q"),
                                         {}, torch::kBFloat16);
                        }),
                        "the hqq backend does not store bitsandbytes' layout");
}
