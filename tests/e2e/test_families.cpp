// trainer on the model families and formats people fine-tune today, end to end: HF directories
// of model_type llama (with Llama 3.1 rope scaling), mistral (sliding window) and qwen2 (q/k/v
// biases) built from stories260K; a bitsandbytes 4-bit directory written by qtune-quantize
// --format bnb, trained under qlora without requantizing and with modules kept dense; DoRA
// (adapter.name=dora) trained, exported in PEFT's layout, merged and resumed.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

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

// stories260K's weights plus zero q/k/v biases: as a Qwen2 model it computes what the Llama
// model computes, bit for bit.
class WithZeroBiases : public qtune::WeightSource {
 public:
  explicit WithZeroBiases(const qtune::WeightSource& w) : w_(w) {}
  std::string describe() const override { return w_.describe() + " + zero biases"; }
  bool has(const std::string& n) const override { return is_bias(n) || w_.has(n); }
  std::vector<int64_t> shape(const std::string& n) const override {
    return is_bias(n) ? std::vector<int64_t>{w_.shape(weight_of(n))[0]} : w_.shape(n);
  }
  torch::Tensor get(const std::string& n, torch::ScalarType dtype) const override {
    return is_bias(n) ? torch::zeros(shape(n), dtype) : w_.get(n, dtype);
  }
  std::vector<std::string> names() const override { return w_.names(); }

 private:
  static bool is_bias(const std::string& n) {
    return n.size() > 5 && n.compare(n.size() - 5, 5, ".bias") == 0;
  }
  static std::string weight_of(const std::string& n) {
    return n.substr(0, n.size() - 5) + ".weight";
  }
  const qtune::WeightSource& w_;
};

// An HF directory of `family` with stories260K's weights and tok512 beside it.
std::string family_dir(const std::string& family, int64_t window = 0) {
  qtune::ModelFiles f = qtune::open_model(data_path("stories260K.bin"));
  qtune::ModelConfig c = f.config;
  c.model_type = family == "llama3" ? "llama" : family;
  if (family == "llama3") {
    // Llama 3.1's scaling at this model's scale: head_dim 8 has wavelengths 6.3 .. 6283; with
    // an original context of 256 the two longest are stretched.
    c.rope_scaling.type = "llama3";
    c.rope_scaling.factor = 8;
    c.rope_scaling.low_freq_factor = 1;
    c.rope_scaling.high_freq_factor = 4;
    c.rope_scaling.original_max_position_embeddings = 256;
  }
  if (family == "mistral") c.sliding_window = window;
  if (family == "qwen2") c.qkv_bias = true;
  const auto dir = qtune::test::temp_dir(family) + "/model";
  WithZeroBiases w(*f.weights);
  qtune::save_hf_model(dir, c, w, torch::kFloat32, data_path("tok512.bin"));
  return dir;
}

std::vector<std::string> train_args(const std::string& model, const std::string& out,
                                    const std::vector<std::string>& extra = {}) {
  std::vector<std::string> args{bin_path("trainer"),
                                "--config",
                                qtune::test::source_dir() + "/configs/default.yaml",
                                "--model",
                                model,
                                "--data",
                                data_path("tinyshakespeare.txt"),
                                "--max_steps",
                                "12",
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
                                "eval.max_batches=2",
                                "train.warmup_steps=0"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

json train_family(const std::string& model, const std::vector<std::string>& extra = {},
           std::string* out_dir = nullptr) {
  const auto out = qtune::test::temp_dir("run");
  auto r = qtune::test::run_program(train_args(model, out, extra));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  if (out_dir) *out_dir = out;
  return qtune::read_json_file(out + "/summary.json");
}

double final_loss(const json& s) { return s["final_val_loss"].get<double>(); }

// Per-step training losses from metrics.jsonl.
}  // namespace

TEST(FamilyRuns, TrainerTrainsLlama3MistralAndQwen2Directories) {
  const std::string llama = family_dir("llama");
  const json base = train_family(llama);
  EXPECT_LT(final_loss(base), base["first_val_loss"].get<double>() - 0.05) << base.dump(2);

  // Same function, same numbers: a window wider than the sequence, zero biases.
  EXPECT_EQ(final_loss(train_family(family_dir("mistral", 4096))), final_loss(base));
  const std::string qwen2 = family_dir("qwen2");
  EXPECT_EQ(qtune::read_json_file(qwen2 + "/config.json")["architectures"][0], "Qwen2ForCausalLM");
  EXPECT_EQ(final_loss(train_family(qwen2)), final_loss(base));
  // What the family changes reaches the trainer: a window shorter than the sequence, rope scaling.
  EXPECT_NE(final_loss(train_family(family_dir("mistral", 16))), final_loss(base));
  EXPECT_NE(final_loss(train_family(family_dir("llama3"))), final_loss(base));

  // Qwen2 under qlora keeps the biases dense beside the 4-bit base; under full they train.
  const json q = train_family(qwen2, {"--train_type", "qlora", "--quant", "nf4"});
  EXPECT_EQ(q["trainable_parameters"], base["trainable_parameters"]);
  std::string full_out;
  train_family(qwen2, {"--train_type", "full"}, &full_out);
  auto st = qtune::SafetensorsFile::open(full_out + "/model/model.safetensors");
  ASSERT_TRUE(st->has("model.layers.0.self_attn.k_proj.bias"));
  EXPECT_GT(st->tensor("model.layers.0.self_attn.k_proj.bias").abs().sum().item<double>(), 0.0);
  EXPECT_EQ(qtune::read_json_file(full_out + "/model/config.json")["model_type"], "qwen2");
}

TEST(FamilyRuns, BnbDirectoryTrainsUnderQloraWithoutRequantizing) {
  const auto dir = qtune::test::temp_dir("bnb") + "/model";
  auto r = qtune::test::run_program({bin_path("qtune-quantize"), "--model",
                                     data_path("stories260K.bin"), "--tokenizer",
                                     data_path("tok512.bin"), "--format", "bnb", "--dtype", "fp32",
                                     "--skip_modules", "layers.0.mlp.down_proj", "--out", dir});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json qc = qtune::read_json_file(dir + "/config.json")["quantization_config"];
  EXPECT_EQ(qc["llm_int8_skip_modules"], json::array({"model.layers.0.mlp.down_proj", "lm_head"}))
      << "the tied head is named too, or transformers quantizes it";
  auto st = qtune::SafetensorsFile::open(dir + "/model.safetensors");
  EXPECT_TRUE(st->has("model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"));
  EXPECT_EQ(st->info("model.layers.0.mlp.down_proj.weight").dtype, "F32");

  // The same run quantizing stories260K on the fly with the same module kept dense (and the tied
  // head dense, as bitsandbytes keeps it) computes exactly the same.
  const json from_bnb = train_family(dir, {"--train_type", "qlora"});
  const json on_the_fly =
      train_family(data_path("stories260K.bin"),
            {"--tokenizer", data_path("tok512.bin"), "--train_type", "qlora",
             "quant.skip_modules=[layers.0.mlp.down_proj]", "quant.skip_output=true"});
  EXPECT_EQ(final_loss(from_bnb), final_loss(on_the_fly));
  EXPECT_EQ(from_bnb["linear_weight_bytes"], on_the_fly["linear_weight_bytes"]);
  const json all_quantized = train_family(
      data_path("stories260K.bin"),
      {"--tokenizer", data_path("tok512.bin"), "--train_type", "qlora", "quant.skip_output=true"});
  EXPECT_GT(on_the_fly["linear_weight_bytes"].get<int64_t>(),
            all_quantized["linear_weight_bytes"].get<int64_t>());

  // A 4-bit directory has no dense projections to train a lora on.
  r = qtune::test::run_program(
      train_args(dir, qtune::test::temp_dir("bad"), {"--train_type", "lora"}));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("is only stored quantized"), std::string::npos) << r.output;
}

TEST(DoraRuns, TrainerTrainsExportsMergesAndResumes) {
  const std::string model = family_dir("llama");
  // The head stays dense: stories260K ties it to the embedding, and a merged model keeps the
  // tie, so a quantized head during training would differ from the merged one (export notes it).
  const std::vector<std::string> dora = {"--train_type", "qlora", "adapter.name=dora",
                                         "quant.skip_output=true", "checkpoint.every=1"};
  std::string out;
  const json s = train_family(model, dora, &out);
  EXPECT_EQ(s["adapter"], "dora");
  EXPECT_LT(final_loss(s), s["first_val_loss"].get<double>() - 0.05) << s.dump(2);
  const json cfg = qtune::read_json_file(out + "/adapter/adapter_config.json");
  EXPECT_EQ(cfg["use_dora"], true);
  EXPECT_EQ(cfg["peft_type"], "LORA");
  auto st = qtune::SafetensorsFile::open(out + "/adapter/adapter_model.safetensors");
  const std::string key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
  ASSERT_TRUE(st->has(key));
  EXPECT_EQ(st->info(key).shape, (std::vector<int64_t>{64}));

  // Merged onto the dequantized base, the dense model computes what base + DoRA computes.
  const auto merged = qtune::test::temp_dir("dora-merged");
  auto r = qtune::test::run_program(
      {bin_path("qtune-export"), "--adapter", out + "/adapter", "--merge", "--out", merged});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto logits = [](const qtune::TrainedModelOptions& o) {
    auto tm = qtune::load_trained_model(o, qtune::test::plugins());
    torch::NoGradGuard no_grad;
    tm.model->eval();
    return tm.model->forward(
        torch::arange(0, 96, torch::kLong).remainder(500).add(3).view({2, 48}));
  };
  qtune::TrainedModelOptions adapted, dense;
  adapted.adapter_dir = out + "/adapter";
  dense.model_path = merged;
  EXPECT_LT((logits(adapted) - logits(dense)).abs().max().item<double>(), 1e-4);

  // Stopped after step 5 (SIGTERM saves and exits 0) and resumed: the same losses, bit for bit.
  const auto b = qtune::test::temp_dir("dora-resume");
  const std::string log = b + "/log.txt";
  const pid_t pid =
      qtune::test::spawn(train_args(model, b, dora), {"QTUNE_DEBUG_PAUSE=step@5"}, log);
  bool paused = false;
  for (int i = 0; i < 12000 && !paused; ++i) {
    paused = fs::exists(b + "/.qtune-debug-paused");
    if (!paused) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(paused) << qtune::test::read_file(log);
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << qtune::test::read_file(log);
  auto args = train_args(model, b, dora);
  args.insert(args.end(), {"--resume", "latest"});
  r = qtune::test::run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(qtune::test::train_losses(b), qtune::test::train_losses(out));
}
