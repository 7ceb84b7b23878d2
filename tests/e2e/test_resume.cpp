// trainer checkpoints and --resume end to end, with real signals to child processes: a run
// killed with SIGKILL (between steps, or in the middle of writing a checkpoint) and resumed has
// the same per-step losses as an uninterrupted run, bit for bit; SIGTERM finishes the step,
// saves and exits 0; a qlora checkpoint holds adapters only and refuses another backend, adapter
// or base model, while the same base in another format is accepted.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "qtune/files.h"
#include "qtune/model.h"
#include "qtune/model_files.h"
#include "qtune/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;
using qtune::test::bin_path;
using qtune::test::data_path;

namespace {

// A tiny lora run with a checkpoint after every step; dropout makes the steps draw from the RNG,
// so resuming must restore its state too.
std::vector<std::string> tiny_run(const std::string& out, int64_t max_steps,
                                  const std::vector<std::string>& extra = {}) {
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
                                std::to_string(max_steps),
                                "--batch_size",
                                "4",
                                "--seq_len",
                                "64",
                                "--threads",
                                "1",
                                "--eval_every",
                                "0",
                                "--output_dir",
                                out,
                                "eval.max_batches=2",
                                "train.warmup_steps=2",
                                "checkpoint.every=1",
                                "checkpoint.keep=3",
                                "adapter.options.dropout=0.1"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

std::vector<std::string> plus(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Exit code, or 128 + signal number.
int wait_child(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

bool wait_for_file(const std::string& path, pid_t pid) {
  for (int i = 0; i < 12000; ++i) {  // 120 s
    if (fs::exists(path)) return true;
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) return false;  // ended without pausing
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

// Runs `args` paused at `point` (QTUNE_DEBUG_PAUSE), then sends `sig`; returns the exit code.
int run_and_signal(const std::vector<std::string>& args, const std::string& point,
                   const std::string& marker, int sig, std::string* output = nullptr) {
  const std::string log = qtune::test::temp_dir("log") + "/out.txt";
  const pid_t pid = qtune::test::spawn(args, {"QTUNE_DEBUG_PAUSE=" + point}, log);
  const bool paused = wait_for_file(marker, pid);
  EXPECT_TRUE(paused) << "the child never paused at " << point << ":\n"
                      << qtune::test::read_file(log);
  if (paused) kill(pid, sig);
  const int code = paused ? wait_child(pid) : -1;
  if (output) *output = qtune::test::read_file(log);
  return code;
}

void expect_identical_losses(const std::vector<double>& want, const std::vector<double>& got) {
  ASSERT_EQ(want.size(), got.size());
  for (size_t i = 0; i < want.size(); ++i)
    EXPECT_EQ(want[i], got[i]) << "step " << i + 1 << std::setprecision(17) << ": " << want[i]
                               << " vs " << got[i];
}

void expect_identical_adapters(const std::string& a, const std::string& b) {
  auto fa = qtune::SafetensorsFile::open(a + "/adapter/adapter_model.safetensors");
  auto fb = qtune::SafetensorsFile::open(b + "/adapter/adapter_model.safetensors");
  ASSERT_EQ(fa->names(), fb->names());
  for (const auto& n : fa->names()) EXPECT_TRUE(torch::equal(fa->tensor(n), fb->tensor(n))) << n;
}

std::vector<std::string> leftovers(const std::string& root) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(root))
    if (e.path().filename().string().rfind(".step-", 0) == 0) out.push_back(e.path().string());
  return out;
}

void expect_one_line_error(const qtune::test::RunResult& r,
                           const std::vector<std::string>& needles) {
  EXPECT_EQ(r.exit_code, 2) << r.output;
  std::string out = r.output;
  // the log lines before the error are fine; the error itself is one line
  const auto pos = out.find("trainer: error:");
  ASSERT_NE(pos, std::string::npos) << out;
  std::string line = out.substr(pos);
  while (!line.empty() && line.back() == '\n') line.pop_back();
  EXPECT_EQ(line.find('\n'), std::string::npos) << line;
  for (const auto& n : needles) EXPECT_NE(line.find(n), std::string::npos) << n << " in " << line;
}

}  // namespace

TEST(Resume, KilledRunsResumeWithIdenticalLosses) {
  const int64_t steps = 8;
  const auto a = qtune::test::temp_dir("uninterrupted");
  auto r = qtune::test::run_program(tiny_run(a, steps));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto want = qtune::test::train_losses(a);
  ASSERT_EQ(want.size(), static_cast<size_t>(steps));

  // SIGKILL after step 5 was logged, before its checkpoint: resumes from step 4, redoes 5.
  const auto b = qtune::test::temp_dir("killed");
  EXPECT_EQ(run_and_signal(tiny_run(b, steps), "step@5", b + "/.qtune-debug-paused", SIGKILL),
            128 + SIGKILL);
  EXPECT_FALSE(fs::exists(b + "/summary.json"));
  EXPECT_EQ(qtune::test::read_file(b + "/checkpoints/latest"), "step-4\n");
  r = qtune::test::run_program(plus(tiny_run(b, steps), {"--resume", "latest"}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_identical_losses(want, qtune::test::train_losses(b));
  expect_identical_adapters(a, b);
  json s = qtune::read_json_file(b + "/summary.json");
  EXPECT_EQ(s["resumed_from"], b + "/checkpoints/step-4");
  EXPECT_EQ(s["steps"], steps);
  // the first eval (step 0) is kept from the first session, not repeated
  EXPECT_EQ(s["first_val_loss"], qtune::read_json_file(a + "/summary.json")["first_val_loss"]);

  // SIGKILL in the middle of writing checkpoint 3 (weights and moments written, state not yet):
  // the temporary directory is all that is left of it; checkpoint 2 and `latest` are intact.
  const auto c = qtune::test::temp_dir("killed-in-save");
  EXPECT_EQ(
      run_and_signal(tiny_run(c, steps), "save@3", c + "/checkpoints/.qtune-debug-paused", SIGKILL),
      128 + SIGKILL);
  EXPECT_EQ(qtune::test::read_file(c + "/checkpoints/latest"), "step-2\n");
  EXPECT_FALSE(fs::exists(c + "/checkpoints/step-3"));
  const auto partial = leftovers(c + "/checkpoints");
  ASSERT_EQ(partial.size(), 1u);
  EXPECT_TRUE(fs::exists(partial[0] + "/optimizer.safetensors"));
  EXPECT_FALSE(fs::exists(partial[0] + "/trainer_state.json"));
  r = qtune::test::run_program(plus(tiny_run(c, steps), {"--resume", "latest"}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_identical_losses(want, qtune::test::train_losses(c));
  EXPECT_TRUE(leftovers(c + "/checkpoints").empty());
  // keep=3: the newest three remain
  for (int s = 1; s <= steps; ++s)
    EXPECT_EQ(fs::exists(c + "/checkpoints/step-" + std::to_string(s)), s > steps - 3) << s;
}

TEST(Resume, SigtermFinishesTheStepSavesAndExitsZero) {
  const auto out = qtune::test::temp_dir("sigterm");
  std::string output;
  EXPECT_EQ(run_and_signal(tiny_run(out, 50, {"checkpoint.every=0"}), "step@2",
                           out + "/.qtune-debug-paused", SIGTERM, &output),
            0)
      << output;
  const std::string line = "stopped at step 2; checkpoint saved to " + out +
                           "/checkpoints/step-2; resume with --resume latest";
  EXPECT_NE(output.find(line), std::string::npos) << output;
  json s = qtune::read_json_file(out + "/summary.json");
  EXPECT_EQ(s["steps"], 2);
  EXPECT_EQ(s["stopped_early"], true);
  EXPECT_EQ(qtune::read_json_file(out + "/checkpoints/step-2/trainer_state.json")["step"], 2);
  // and it goes on from there
  auto r = qtune::test::run_program(plus(tiny_run(out, 3), {"--resume", "latest"}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(qtune::read_json_file(out + "/summary.json")["steps"], 3);
  EXPECT_EQ(qtune::test::train_losses(out).size(), 3u);
}

// Under qlora the checkpoint holds the adapters and training state only; the base is rebuilt
// from the model the checkpoint names, and a resume against another backend, adapter setting or
// base is refused in one line naming both values. The same base in another format (an HF copy,
// a qtune-quantize directory with the same options) is accepted.
TEST(Resume, QloraCheckpointHoldsAdaptersOnlyAndChecksTheBase) {
  const auto out = qtune::test::temp_dir("qlora");
  const std::vector<std::string> qlora{"--train_type", "qlora", "--quant", "nf4"};
  auto r = qtune::test::run_program(tiny_run(out, 2, qlora));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string ckpt = out + "/checkpoints/step-2";
  std::set<std::string> files;
  for (const auto& e : fs::directory_iterator(ckpt)) files.insert(e.path().filename().string());
  EXPECT_EQ(files, (std::set<std::string>{"adapter_config.json", "adapter_model.safetensors",
                                          "optimizer.safetensors", "trainer_state.json"}));
  auto st = qtune::SafetensorsFile::open(ckpt + "/adapter_model.safetensors");
  for (const auto& n : st->names()) EXPECT_NE(n.find(".lora_"), std::string::npos) << n;
  json state = qtune::read_json_file(ckpt + "/trainer_state.json");
  EXPECT_EQ(state["identity"]["quant"], "nf4");
  EXPECT_EQ(state["identity"]["train_type"], "qlora");
  EXPECT_EQ(state["identity"]["base"]["path"],
            fs::absolute(data_path("stories260K.bin")).lexically_normal().string());
  EXPECT_EQ(state["identity"]["quant_options"]["block_size"], 64);

  auto resume = [&](const std::vector<std::string>& extra) {
    return qtune::test::run_program(
        plus(tiny_run(out, 3, qlora), plus({"--resume", "latest"}, extra)));
  };
  const std::string what = "cannot resume from " + ckpt;
  expect_one_line_error(resume({"quant.name=int8"}), {what, "\"nf4\"", "\"int8\""});
  expect_one_line_error(resume({"quant.options.block_size=32"}),
                        {what, "quant_options.block_size 64", "32"});
  expect_one_line_error(resume({"adapter.options.rank=4"}), {what, "adapter_options.rank 8", "4"});
  expect_one_line_error(resume({"train_type=lora"}), {what, "\"qlora\"", "\"lora\""});

  // Another model of the same architecture: refused, naming both.
  const auto other = qtune::test::temp_dir("other-base");
  {
    auto files260k = qtune::open_model(data_path("stories260K.bin"));
    auto w = qtune::random_weights(files260k.config, 5);
    qtune::save_hf_model(other, files260k.config, *w, torch::kFloat32);
  }
  expect_one_line_error(resume({"model.path=" + other}),
                        {what, "stories260K.bin", other, "base model"});

  // The same weights as an HF directory, and as an nf4 qtune-quantize directory: accepted.
  const auto hf = qtune::test::temp_dir("hf-copy");
  r = qtune::test::run_program({bin_path("qtune-convert"), "--model", data_path("stories260K.bin"),
                                "--out", hf, "--dtype", "bf16"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = resume({"model.path=" + hf});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  const auto quantized = qtune::test::temp_dir("nf4-copy");
  r = qtune::test::run_program({bin_path("qtune-quantize"), "--model", data_path("stories260K.bin"),
                                "--quant", "nf4", "--out", quantized});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = qtune::test::run_program(
      plus(tiny_run(out, 4, qlora), {"--resume", ckpt, "model.path=" + quantized}));
  EXPECT_EQ(r.exit_code, 0) << r.output;
}
