// trainer end to end on the shared stories260K model: full and lora fine-tunes lower the
// held-out loss; user errors end with one clear line and exit code 2.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>

#include <nlohmann/json.hpp>

#include "qtune/files.h"
#include "test_util.h"

using nlohmann::json;
using qtune::test::bin_path;
using qtune::test::data_path;

namespace {

// A short run: 40 steps of 8 x 128 tokens, single-threaded (ctest runs tests in parallel).
std::vector<std::string> short_run(const std::string& out, const std::string& train_type) {
  return {bin_path("trainer"),
          "--config", qtune::test::source_dir() + "/configs/default.yaml",
          "--model", data_path("stories260K.bin"),
          "--tokenizer", data_path("tok512.bin"),
          "--data", data_path("tinyshakespeare.txt"),
          "--train_type", train_type,
          "--max_steps", "40", "--batch_size", "8", "--seq_len", "128",
          "--eval_every", "20", "--threads", "1",
          "--output_dir", out,
          "eval.max_batches=4", "train.warmup_steps=5"};
}

json run_and_summarize(const std::vector<std::string>& args, const std::string& out) {
  auto r = qtune::test::run_program(args);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return qtune::read_json_file(out + "/summary.json");
}

}  // namespace

TEST(Trainer, LoraLowersHeldOutLossAndWritesPeftAdapter) {
  const auto out = qtune::test::temp_dir("lora");
  json s = run_and_summarize(short_run(out, "lora"), out);
  EXPECT_EQ(s["train_type"], "lora");
  EXPECT_EQ(s["steps"], 40);
  EXPECT_LT(s["final_val_loss"].get<double>(), s["first_val_loss"].get<double>() - 0.5) << s.dump(2);
  EXPECT_LT(s["trainable_parameters"].get<int64_t>(), s["total_parameters"].get<int64_t>() / 4);
  // metrics.jsonl: one train line per step, eval lines at 0, 20, 40
  std::ifstream m(out + "/metrics.jsonl");
  int train_lines = 0, eval_lines = 0;
  for (std::string line; std::getline(m, line);) {
    auto j = json::parse(line);
    if (j["type"] == "train") {
      ++train_lines;
      for (const char* k : {"step", "loss", "lr", "grad_norm", "tokens_per_s"})
        EXPECT_TRUE(j.contains(k)) << k;
    } else if (j["type"] == "eval") {
      ++eval_lines;
      EXPECT_TRUE(j.contains("val_loss"));
    }
  }
  EXPECT_EQ(train_lines, 40);
  EXPECT_EQ(eval_lines, 3);
  auto cfg = qtune::read_json_file(out + "/adapter/adapter_config.json");
  EXPECT_EQ(cfg["peft_type"], "LORA");
  EXPECT_EQ(cfg["r"], 8);
  std::ifstream st(out + "/adapter/adapter_model.safetensors");
  EXPECT_TRUE(st.good());
}

TEST(Trainer, PeakRssIsTheTrainersOwnNotItsParents) {
  // A parent much larger than the trainer: getrusage's ru_maxrss would carry its peak across
  // fork and exec into the child's summary (VmHWM does not).
  std::vector<char> ballast(size_t{1536} << 20);
  for (size_t i = 0; i < ballast.size(); i += 4096) ballast[i] = static_cast<char>(i >> 12);
  const auto out = qtune::test::temp_dir("peak");
  auto args = short_run(out, "lora");
  for (size_t i = 0; i + 1 < args.size(); ++i)
    if (args[i] == "--max_steps" || args[i] == "--eval_every") args[i + 1] = "2";
  json s = run_and_summarize(args, out);
  const double peak = s["peak_rss_bytes"].get<double>();
  EXPECT_GT(peak, 20e6) << s.dump(2);
  EXPECT_LT(peak, 1e9) << "the trainer of stories260K reports its parent's 1.5 GB peak";
  EXPECT_EQ(ballast[4096], 1);  // keeps the ballast alive until the child has run
}

TEST(Trainer, FullFineTuneLowersHeldOutLossAndSavesHfModel) {
  const auto out = qtune::test::temp_dir("full");
  auto args = short_run(out, "full");
  args.push_back("train.lr=0.001");
  json s = run_and_summarize(args, out);
  EXPECT_EQ(s["train_type"], "full");
  EXPECT_EQ(s["trainable_parameters"], s["total_parameters"]);
  EXPECT_LT(s["final_val_loss"].get<double>(), s["first_val_loss"].get<double>() - 0.5) << s.dump(2);
  auto cfg = qtune::read_json_file(out + "/model/config.json");
  EXPECT_EQ(cfg["hidden_size"], 64);
  std::ifstream st(out + "/model/model.safetensors");
  EXPECT_TRUE(st.good());
}

namespace {
// Runs trainer expecting a user error: exit code 2 and exactly one line mentioning `needle`.
void expect_user_error(const std::vector<std::string>& args, const std::string& needle) {
  auto r = qtune::test::run_program(args);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  std::string out = r.output;
  while (!out.empty() && out.back() == '\n') out.pop_back();
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 0) << "expected one line, got:\n" << r.output;
  EXPECT_NE(out.find("trainer: error:"), std::string::npos) << out;
  EXPECT_NE(out.find(needle), std::string::npos) << out;
}
}  // namespace

TEST(Trainer, MissingModelFileIsOneClearLine) {
  expect_user_error({bin_path("trainer"), "--model", "/nonexistent/model.bin"}, "/nonexistent/model.bin");
}

TEST(Trainer, UnknownKeyIsOneClearLine) {
  expect_user_error({bin_path("trainer"), "train.learning_rate=0.1"}, "train.learning_rate");
  const auto dir = qtune::test::temp_dir("cfg");
  std::ofstream(dir + "/bad.yaml") << "train:\n  max_step: 3\n";
  expect_user_error({bin_path("trainer"), "--config", dir + "/bad.yaml"}, "train.max_step");
}

TEST(Trainer, WrongTypeIsOneClearLine) {
  expect_user_error({bin_path("trainer"), "train.batch_size=big"}, "train.batch_size must be an integer");
}

TEST(Trainer, UnknownPluginIsOneClearLine) {
  expect_user_error({bin_path("trainer"), "--train_type", "qlora", "--quant", "nf5"}, "nf5");
  expect_user_error({bin_path("trainer"), "--adapter", "vera"}, "vera");
}

TEST(Trainer, PrintConfigAndListPlugins) {
  auto r = qtune::test::run_program({bin_path("trainer"), "--print-config", "train.lr=0.01"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto j = json::parse(r.output);
  EXPECT_DOUBLE_EQ(j["train"]["lr"].get<double>(), 0.01);
  EXPECT_EQ(j["adapter"]["options"]["rank"], 8);  // the plugin's schema filled in
  r = qtune::test::run_program({bin_path("trainer"), "--list-plugins"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("lora"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("nf4"), std::string::npos) << r.output;
}

// The dist.* keys through trainer: recorded in the checked recipe, and each range refused naming
// the key. (tests/dist runs them across ranks: gloo, the bucket size and timeout in the 1-vs-N
// parity runs, the master address and port under SLURM variables, the sharded base and
// optimizer state.)
TEST(Trainer, DistKeysAreRecordedAndChecked) {
  auto r = qtune::test::run_program(
      {bin_path("trainer"), "--print-config", "--train_type", "qlora", "dist.backend=gloo",
       "dist.timeout_s=20", "dist.master_addr=127.0.0.1", "dist.master_port=29611",
       "dist.bucket_mb=1.5", "dist.shard_base=true", "dist.shard_optimizer=true"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto d = json::parse(r.output)["dist"];
  EXPECT_EQ(d["backend"], "gloo");
  EXPECT_DOUBLE_EQ(d["timeout_s"].get<double>(), 20.0);
  EXPECT_EQ(d["master_addr"], "127.0.0.1");
  EXPECT_EQ(d["master_port"], 29611);
  EXPECT_DOUBLE_EQ(d["bucket_mb"].get<double>(), 1.5);
  EXPECT_EQ(d["shard_base"], true);
  EXPECT_EQ(d["shard_optimizer"], true);
  expect_user_error({bin_path("trainer"), "dist.backend=mpi"},
                    "dist.backend must be auto, gloo or nccl, got \"mpi\"");
  expect_user_error({bin_path("trainer"), "dist.timeout_s=0"},
                    "dist.timeout_s must be in (0, 86400]");
  expect_user_error({bin_path("trainer"), "dist.master_port=70000"},
                    "dist.master_port must be in [1, 65535], got 70000");
  expect_user_error({bin_path("trainer"), "dist.bucket_mb=0"},
                    "dist.bucket_mb must be in (0, 4096]");
}

// The recipe keys the other e2e runs leave at their defaults, each set through trainer and each
// shown to act: the recipe records it, and the run's numbers follow from it.
TEST(Trainer, AdapterDataAndOptimizerKeysTakeEffect) {
  const auto out = qtune::test::temp_dir("keys");
  const auto val = qtune::test::temp_dir("keys-val") + "/val.txt";
  {
    std::ofstream v(val);
    v << qtune::test::read_file(data_path("tinyshakespeare.txt")).substr(0, 20000);
  }
  auto args = short_run(out, "lora");
  for (const char* kv :
       {"train.max_steps=6", "eval.every=0", "adapter.name=lora", "adapter.target_modules=[q, v]",
        "data.format=text", "train.activation_checkpointing=true", "train.eps=1e-6",
        "train.grad_accum=2", "train.max_grad_norm=0.5", "train.min_lr_ratio=0.25",
        "train.weight_decay=0.01", "train.warmup_steps=1"})
    args.push_back(kv);
  args.push_back("data.val_path=" + val);
  json s = run_and_summarize(args, out);
  const json r = qtune::read_json_file(out + "/recipe.json");
  EXPECT_EQ(r["adapter"]["target_modules"], json({"q", "v"}));
  EXPECT_EQ(r["data"]["val_path"], val);
  EXPECT_EQ(r["train"]["grad_accum"], 2);
  EXPECT_TRUE(r["train"]["activation_checkpointing"].get<bool>());
  EXPECT_DOUBLE_EQ(r["train"]["eps"].get<double>(), 1e-6);
  EXPECT_DOUBLE_EQ(r["train"]["max_grad_norm"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(r["train"]["weight_decay"].get<double>(), 0.01);
  // grad_accum: two micro-batches of 8 x 128 tokens per step.
  EXPECT_EQ(s["tokens"], 6 * 2 * 8 * 128) << s.dump(2);
  // min_lr_ratio: the cosine ends at lr x 0.25 on the last step.
  std::ifstream m(out + "/metrics.jsonl");
  double last_lr = 0;
  for (std::string line; std::getline(m, line);) {
    auto j = json::parse(line);
    if (j["type"] == "train") last_lr = j["lr"].get<double>();
  }
  EXPECT_NEAR(last_lr, r["train"]["lr"].get<double>() * 0.25, 1e-12);
  // target_modules [q, v]: an adapter on q and v only (rank 8: (in + out) x 8 each).
  auto cfg = qtune::read_json_file(out + "/adapter/adapter_config.json");
  std::vector<std::string> targets = cfg["target_modules"];
  std::sort(targets.begin(), targets.end());
  EXPECT_EQ(targets, (std::vector<std::string>{"q_proj", "v_proj"}));
  // data.val_path: the held-out loss comes from that file.
  EXPECT_TRUE(s["final_val_loss"].is_number());

  // data.val_fraction: without a val file, that share of the documents is held out; a value
  // outside (0, 1) is refused naming the key.
  const auto out2 = qtune::test::temp_dir("keys-frac");
  auto args2 = short_run(out2, "lora");
  args2.insert(args2.end(), {"train.max_steps=2", "data.val_fraction=0.2"});
  json s2 = run_and_summarize(args2, out2);
  EXPECT_TRUE(s2["final_val_loss"].is_number());
  auto bad = short_run(qtune::test::temp_dir("keys-bad"), "lora");
  bad.push_back("data.val_fraction=1.5");
  auto rb = qtune::test::run_program(bad);
  EXPECT_EQ(rb.exit_code, 2) << rb.output;
  EXPECT_NE(rb.output.find("data.val_fraction must be in (0, 1)"), std::string::npos) << rb.output;
}
