// What training produces, loaded elsewhere: PEFT files with PEFT's keys, shapes and config
// fields; qtune-export --merge gives an HF model whose logits equal base + adapter (lora, and
// qlora merged onto the dequantized base); --requantize writes a loadable quantized model; a
// checkpoint exports like an adapter; an adapter is refused on the wrong base; an adapter from
// another tool (no qtune metadata) loads from its PEFT config; qtune-generate reproduces
// llama2.c's greedy text and shows what an adapter changed.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "qtune/files.h"
#include "qtune/trained_model.h"
#include "qtune/model.h"
#include "qtune/model_files.h"
#include "qtune/registry.h"
#include "qtune/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;
using qtune::test::bin_path;
using qtune::test::data_path;

namespace {

// A short run that moves the adapters well away from zero (lr 1e-2), so merged and unmerged
// models differ from the base by much more than the tolerances below.
std::string train(const std::string& tag, const std::vector<std::string>& extra = {}) {
  const auto out = qtune::test::temp_dir(tag);
  std::vector<std::string> args{bin_path("trainer"),
                                "--config",
                                qtune::test::source_dir() + "/configs/default.yaml",
                                "--model",
                                data_path("stories260K.bin"),
                                "--tokenizer",
                                data_path("tok512.bin"),
                                "--data",
                                data_path("tinyshakespeare.txt"),
                                "--max_steps",
                                "4",
                                "--batch_size",
                                "4",
                                "--seq_len",
                                "64",
                                "--threads",
                                "1",
                                "--eval_every",
                                "0",
                                "--lr",
                                "0.01",
                                "--output_dir",
                                out,
                                "eval.max_batches=1",
                                "train.warmup_steps=0"};
  args.insert(args.end(), extra.begin(), extra.end());
  auto r = qtune::test::run_program(args);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return out;
}

qtune::test::RunResult run(std::vector<std::string> args) {
  args[0] = bin_path(args[0]);
  return qtune::test::run_program(args);
}

using qtune::test::plugins;

// Logits of a fixed batch of text-like token ids.
torch::Tensor logits_of(qtune::LlamaForCausalLMImpl& m) {
  torch::NoGradGuard no_grad;
  m.eval();
  auto tokens = torch::arange(0, 96, torch::kLong).mul(37).remainder(509).add(3).view({2, 48});
  return m.forward(tokens);
}

torch::Tensor adapted_logits(const std::string& adapter_dir, const std::string& quant = "") {
  qtune::TrainedModelOptions o;
  o.adapter_dir = adapter_dir;
  o.quant = quant;
  if (!quant.empty()) o.model_path = data_path("stories260K.bin");
  auto tm = qtune::load_trained_model(o, plugins());
  return logits_of(*tm.model);
}

torch::Tensor model_logits(const std::string& model_dir) {
  qtune::TrainedModelOptions o;
  o.model_path = model_dir;
  auto tm = qtune::load_trained_model(o, plugins());
  return logits_of(*tm.model);
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

void expect_one_line_error(const qtune::test::RunResult& r, const std::string& program,
                           const std::vector<std::string>& needles) {
  EXPECT_EQ(r.exit_code, 2) << r.output;
  std::string out = r.output;
  while (!out.empty() && out.back() == '\n') out.pop_back();
  EXPECT_EQ(out.find('\n'), std::string::npos) << "expected one line:\n" << r.output;
  EXPECT_EQ(out.rfind(program + ": error: ", 0), 0u) << out;
  for (const auto& n : needles) EXPECT_NE(out.find(n), std::string::npos) << n << " in " << out;
}

std::string trimmed(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

}  // namespace

// The files HF PEFT reads: adapter_config.json fields and adapter_model.safetensors keys/shapes
// (base_model.model.<HF module path>.lora_A.weight [r, in], lora_B.weight [out, r]).
TEST(Export, PeftFilesHaveKeysShapesAndConfig) {
  const auto out = train("peft");
  const auto dir = out + "/adapter";
  json cfg = qtune::read_json_file(dir + "/adapter_config.json");
  EXPECT_EQ(cfg["peft_type"], "LORA");
  EXPECT_EQ(cfg["task_type"], "CAUSAL_LM");
  EXPECT_EQ(cfg["r"], 8);
  EXPECT_EQ(cfg["lora_alpha"], 16);
  EXPECT_EQ(cfg["use_rslora"], false);
  EXPECT_EQ(cfg["bias"], "none");
  EXPECT_TRUE(cfg["base_model_name_or_path"].get<std::string>().find("stories260K.bin") !=
              std::string::npos);
  EXPECT_EQ(cfg["target_modules"],
            json({"down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"}));

  // stories260K: dim 64, hidden 172, 8 heads, 4 kv heads (kv dim 32), 5 layers
  const std::map<std::string, std::pair<int64_t, int64_t>> in_out{
      {"self_attn.q_proj", {64, 64}}, {"self_attn.k_proj", {64, 32}},
      {"self_attn.v_proj", {64, 32}}, {"self_attn.o_proj", {64, 64}},
      {"mlp.gate_proj", {64, 172}},   {"mlp.up_proj", {64, 172}},
      {"mlp.down_proj", {172, 64}}};
  auto st = qtune::SafetensorsFile::open(dir + "/adapter_model.safetensors");
  std::set<std::string> expected;
  for (int layer = 0; layer < 5; ++layer)
    for (const auto& [module, io] : in_out) {
      const std::string p = "base_model.model.model.layers." + std::to_string(layer) + "." + module;
      expected.insert(p + ".lora_A.weight");
      expected.insert(p + ".lora_B.weight");
      EXPECT_EQ(st->info(p + ".lora_A.weight").shape, (std::vector<int64_t>{8, io.first})) << p;
      EXPECT_EQ(st->info(p + ".lora_B.weight").shape, (std::vector<int64_t>{io.second, 8})) << p;
      EXPECT_EQ(st->info(p + ".lora_A.weight").dtype, "F32");
    }
  auto names = st->names();
  EXPECT_EQ(std::set<std::string>(names.begin(), names.end()), expected);
  EXPECT_EQ(st->metadata().at("format"), "pt");

  // A checkpoint of the run is an adapter directory too; exporting it without --merge gives
  // the same tensors.
  const auto exported = qtune::test::temp_dir("peft-export");
  auto r = run({"qtune-export", "--adapter", out + "/checkpoints/step-4", "--out", exported});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto again = qtune::SafetensorsFile::open(exported + "/adapter_model.safetensors");
  for (const auto& n : names) EXPECT_TRUE(torch::equal(st->tensor(n), again->tensor(n))) << n;
  EXPECT_EQ(qtune::read_json_file(exported + "/adapter_config.json")["r"], 8);
}

// Tolerances: fp32 merged weights W + scale*B@A are rounded once more than the unmerged path,
// ~1e-6 relative; on logits of magnitude ~10 that is < 1e-4 absolute. bf16 storage rounds every
// weight to 8 bits of mantissa (relative 2^-9): measured ~0.05 on these logits; 0.25 allowed.
TEST(Export, MergedLogitsEqualBasePlusAdapter) {
  const auto out = train("merge");
  const auto adapted = adapted_logits(out + "/adapter");
  const auto base = model_logits(data_path("stories260K.bin"));
  ASSERT_GT(max_diff(adapted, base), 0.1) << "the adapter should have changed the model";

  const auto fp32 = qtune::test::temp_dir("merged32");
  auto r = run({"qtune-export", "--adapter", out + "/adapter", "--merge", "--out", fp32});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  json cfg = qtune::read_json_file(fp32 + "/config.json");
  EXPECT_EQ(cfg["torch_dtype"], "float32");
  EXPECT_EQ(cfg["architectures"][0], "LlamaForCausalLM");
  EXPECT_TRUE(fs::exists(fp32 + "/tokenizer.bin"));  // the run's tokenizer, copied
  const double d32 = max_diff(model_logits(fp32), adapted);
  EXPECT_LT(d32, 1e-4) << "fp32 merged vs base+adapter";

  const auto bf16 = qtune::test::temp_dir("merged16");
  r = run(
      {"qtune-export", "--adapter", out + "/adapter", "--merge", "--dtype", "bf16", "--out", bf16});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto st = qtune::SafetensorsFile::open(bf16 + "/model.safetensors");
  EXPECT_EQ(st->info("model.layers.0.self_attn.q_proj.weight").dtype, "BF16");
  const double d16 = max_diff(model_logits(bf16), adapted);
  EXPECT_LT(d16, 0.25) << "bf16 merged vs base+adapter";
  std::printf(
      "[ measured ] merged vs base+adapter logits: fp32 %.3g, bf16 %.3g (adapter moved "
      "them by %.3g)\n",
      d32, d16, max_diff(adapted, base));
}

// QLoRA merges onto the dequantized base, so the merged fp32 model computes what the quantized
// model + adapter computed (to fp32 rounding). Requantizing the merged model gives a directory
// that loads quantized; its logits stay within NF4's error of the merged ones.
TEST(Export, QloraMergesOntoTheDequantizedBase) {
  const auto out =
      train("qlora", {"--train_type", "qlora", "--quant", "nf4", "quant.skip_output=true"});
  const auto adapted = adapted_logits(out + "/adapter");
  const auto merged = qtune::test::temp_dir("qmerged");
  auto r = run({"qtune-export", "--adapter", out + "/adapter", "--merge", "--out", merged});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto merged_logits = model_logits(merged);
  const double d = max_diff(merged_logits, adapted);
  EXPECT_LT(d, 1e-4) << "merged (dequantized base + delta) vs nf4 base + adapter";
  // ... and not the original base + adapter: the base really was the dequantized one
  const double from_original = max_diff(merged_logits, model_logits(data_path("stories260K.bin")));
  EXPECT_GT(from_original, 10 * d);

  const auto requant = qtune::test::temp_dir("requant");
  r = run(
      {"qtune-export", "--adapter", out + "/adapter", "--requantize", "int8", "--out", requant});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("requantized with int8"), std::string::npos) << r.output;
  EXPECT_TRUE(qtune::read_json_file(requant + "/config.json").contains("quantization_config"));
  const double dq = max_diff(model_logits(requant), merged_logits);
  EXPECT_LT(dq, 0.05 * merged_logits.abs().max().item<double>()) << "int8 requantized vs merged";
  std::printf(
      "[ measured ] qlora merged vs nf4+adapter logits %.3g; int8-requantized vs merged "
      "%.3g\n",
      d, dq);
}

// A full fine-tune's checkpoint exports as the whole model, identical to the trainer's own
// model/ output.
TEST(Export, FullFineTuneCheckpointExportsTheModel) {
  const auto out = train("full", {"--train_type", "full", "train.lr=0.001"});
  const auto exported = qtune::test::temp_dir("full-export");
  auto r = run({"qtune-export", "--adapter", out + "/checkpoints/step-4", "--out", exported});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto a = qtune::SafetensorsFile::open(out + "/model/model.safetensors");
  auto b = qtune::SafetensorsFile::open(exported + "/model.safetensors");
  ASSERT_EQ(a->names(), b->names());
  for (const auto& n : a->names()) EXPECT_TRUE(torch::equal(a->tensor(n), b->tensor(n))) << n;
}

TEST(Export, AdapterOnTheWrongBaseIsRefused) {
  const auto out = train("wrongbase");
  auto files = qtune::open_model(data_path("stories260K.bin"));
  const auto same_shape = qtune::test::temp_dir("same-shape");
  qtune::save_hf_model(same_shape, files.config, *qtune::random_weights(files.config, 9),
                       torch::kFloat32);
  auto r = run({"qtune-export", "--adapter", out + "/adapter", "--model", same_shape, "--merge",
                "--out", qtune::test::temp_dir("x")});
  expect_one_line_error(r, "qtune-export",
                        {"adapter " + out + "/adapter", "stories260K.bin", same_shape,
                         "different embedding/norm weights"});
  auto wide_config = files.config;
  wide_config.hidden_size = 128;
  const auto wide = qtune::test::temp_dir("wide");
  qtune::save_hf_model(wide, wide_config, *qtune::random_weights(wide_config, 9), torch::kFloat32);
  r = run({"qtune-generate", "--adapter", out + "/adapter", "--model", wide, "--tokenizer",
           data_path("tok512.bin")});
  expect_one_line_error(r, "qtune-generate", {"hidden_size 64", "hidden_size 128"});
}

// An adapter written by another tool has only PEFT's files: its config decides rank, alpha and
// targets. Doubling lora_alpha doubles the merged update.
TEST(Export, ForeignPeftAdapterLoadsFromItsConfig) {
  const auto out = train("foreign");
  const auto foreign = qtune::test::temp_dir("foreign");
  {
    auto st = qtune::SafetensorsFile::open(out + "/adapter/adapter_model.safetensors");
    std::map<std::string, torch::Tensor> tensors;
    for (const auto& n : st->names()) tensors[n] = st->tensor(n);
    qtune::write_safetensors(foreign + "/adapter_model.safetensors", tensors, {{"format", "pt"}});
  }
  json cfg = qtune::read_json_file(out + "/adapter/adapter_config.json");
  cfg["lora_alpha"] = 32;
  std::ofstream(foreign + "/adapter_config.json") << cfg.dump(2);

  const auto m16 = qtune::test::temp_dir("m16"), m32 = qtune::test::temp_dir("m32");
  auto r = run({"qtune-export", "--adapter", out + "/adapter", "--merge", "--out", m16});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run({"qtune-export", "--adapter", foreign, "--model", data_path("stories260K.bin"),
           "--tokenizer", data_path("tok512.bin"), "--merge", "--out", m32});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto base = qtune::open_model(data_path("stories260K.bin"));
  auto a = qtune::SafetensorsFile::open(m16 + "/model.safetensors");
  auto b = qtune::SafetensorsFile::open(m32 + "/model.safetensors");
  const std::string n = "model.layers.2.mlp.down_proj.weight";
  auto w0 = base.weights->get(n, torch::kFloat32);
  auto delta16 = a->tensor(n) - w0, delta32 = b->tensor(n) - w0;
  EXPECT_GT(delta16.abs().max().item<double>(), 1e-4);
  EXPECT_TRUE(torch::allclose(delta32, 2 * delta16, 1e-4, 1e-6));
}

TEST(Generate, GreedyMatchesLlama2cAndAdaptersChangeIt) {
  const std::string ref =
      trimmed(qtune::test::read_file(data_path("stories260K_greedy_reference.txt")));
  auto r = run({"qtune-generate", "--model", data_path("stories260K.bin"), "--tokenizer",
                data_path("tok512.bin"), "--threads", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // stdout (the text) then the one-line stats on stderr
  std::string text = r.output.substr(0, r.output.rfind("qtune-generate: "));
  EXPECT_EQ(trimmed(text), ref);

  // A prompt is printed as the model saw it, then continued.
  r = run({"qtune-generate", "--model", data_path("stories260K.bin"), "--tokenizer",
           data_path("tok512.bin"), "--prompt", "Once upon a time", "--max_new_tokens", "20"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.rfind("Once upon a time", 0), 0u) << r.output;

  const auto out = train("generate");
  r = run({"qtune-generate", "--adapter", out + "/adapter", "--max_new_tokens", "60"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.substr(0, 80), ref.substr(0, 80)) << "the adapter should change the text";
  EXPECT_NE(r.output.find("adapter " + out + "/adapter"), std::string::npos) << r.output;

  std::vector<std::string> sample{"qtune-generate",
                                  "--adapter",
                                  out + "/checkpoints/step-4",
                                  "--prompt",
                                  "Once",
                                  "--max_new_tokens",
                                  "40",
                                  "--temperature",
                                  "0.9",
                                  "--top_p",
                                  "0.9"};
  auto with_seed = [&](const char* seed) {
    auto v = sample;
    v.push_back("--seed");
    v.push_back(seed);
    return run(v);
  };
  auto s1 = with_seed("1"), s1b = with_seed("1"), s2 = with_seed("2");
  ASSERT_EQ(s1.exit_code, 0) << s1.output;
  auto text_of = [](const std::string& o) { return o.substr(0, o.rfind("qtune-generate: ")); };
  EXPECT_EQ(text_of(s1.output), text_of(s1b.output)) << "same seed, same text";
  EXPECT_NE(text_of(s1.output), text_of(s2.output)) << "another seed, another text";
}
