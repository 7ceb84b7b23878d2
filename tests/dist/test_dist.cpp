// Data-parallel trainer runs on loopback, every process bounded in time: N ranks x batch B give the
// per-step losses of 1 rank x N*B (full, lora, qlora-nf4; with activation checkpointing; 3 ranks
// over an uneven epoch too);
// SIGTERM to one rank stops every rank after the step with a checkpoint, SIGKILL of one rank
// makes the others exit naming it, and resuming either matches the uninterrupted run bit for
// bit; a sharded base and sharded AdamW moments compute the unsharded job bit for bit; a rank with another recipe, an unreachable master and SLURM's variables with the master
// from the recipe.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <nlohmann/json.hpp>
#include <thread>
#include <torch/cuda.h>

#include "qtune/launcher.h"
#include "test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;
using qtune::test::bin_path;
using qtune::test::data_path;

namespace {

constexpr double kLimitS = 90;  // no trainer process of these tests may run longer

std::vector<std::string> run_args(const std::string& out, const std::string& train_type,
                                  int64_t batch, int64_t steps,
                                  const std::vector<std::string>& extra = {}) {
  std::vector<std::string> a{bin_path("trainer"),
                             "--config",
                             qtune::test::source_dir() + "/configs/default.yaml",
                             "--model",
                             data_path("stories260K.bin"),
                             "--tokenizer",
                             data_path("tok512.bin"),
                             "--data",
                             data_path("tinyshakespeare.txt"),
                             "--train_type",
                             train_type,
                             "--max_steps",
                             std::to_string(steps),
                             "--batch_size",
                             std::to_string(batch),
                             "--seq_len",
                             "32",
                             "--threads",
                             "1",
                             "--eval_every",
                             "0",
                             "--output_dir",
                             out,
                             "eval.max_batches=3",
                             "train.warmup_steps=1",
                             "adapter.options.dropout=0.0",
                             "dist.timeout_s=20"};
  if (train_type == "qlora") a.insert(a.end(), {"--quant", "nf4"});
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

std::vector<std::string> plus(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Waits for `pid` at most until `deadline`, then kills it. Exit code, 128 + signal, or -1.
int wait_bounded(pid_t pid, std::chrono::steady_clock::time_point deadline) {
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::chrono::steady_clock::time_point limit() {
  return std::chrono::steady_clock::now() + std::chrono::milliseconds(int64_t(kLimitS * 1000));
}

qtune::test::RunResult run(const std::vector<std::string>& args,
                           const std::vector<std::string>& env = {}) {
  const std::string log = qtune::test::temp_dir("dist-log") + "/out.txt";
  qtune::test::RunResult r;
  r.exit_code = wait_bounded(qtune::test::spawn(args, env, log), limit());
  r.output = qtune::test::read_file(log);
  return r;
}

// Ranks started the way torchrun starts them: one process each, with its variables.
struct Ranks {
  std::vector<pid_t> pids;
  std::vector<std::string> logs;
};
Ranks start_ranks(const std::vector<std::vector<std::string>>& args,
                  const std::vector<std::vector<std::string>>& extra_env, int port) {
  Ranks r;
  const int n = static_cast<int>(args.size());
  for (int i = 0; i < n; ++i) {
    std::vector<std::string> env{"RANK=" + std::to_string(i), "WORLD_SIZE=" + std::to_string(n),
                                 "LOCAL_RANK=" + std::to_string(i),
                                 "LOCAL_WORLD_SIZE=" + std::to_string(n), "MASTER_ADDR=127.0.0.1",
                                 "MASTER_PORT=" + std::to_string(port)};
    env.insert(env.end(), extra_env[i].begin(), extra_env[i].end());
    r.logs.push_back(qtune::test::temp_dir("rank") + "/out.txt");
    r.pids.push_back(qtune::test::spawn(args[i], env, r.logs.back()));
  }
  return r;
}

std::vector<int> wait_all(const Ranks& r) {
  const auto deadline = limit();
  std::vector<int> codes;
  for (pid_t p : r.pids) codes.push_back(wait_bounded(p, deadline));
  return codes;
}

bool wait_for_file(const std::string& path, double seconds) {
  for (int i = 0; i < seconds * 100; ++i) {
    if (fs::exists(path)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "missing " << path;
  return json::parse(in);
}

std::vector<json> records(const std::string& out, const std::string& type) {
  std::ifstream in(out + "/metrics.jsonl");
  std::vector<json> v;
  for (std::string line; std::getline(in, line);) {
    auto j = json::parse(line);
    if (j["type"] == type) v.push_back(j);
  }
  return v;
}

std::vector<double> losses(const std::string& out) {
  std::vector<double> l;
  for (const auto& j : records(out, "train")) l.push_back(j["loss"].get<double>());
  return l;
}

void expect_close(const std::vector<double>& want, const std::vector<double>& got, double tol) {
  ASSERT_EQ(want.size(), got.size());
  for (size_t i = 0; i < want.size(); ++i)
    EXPECT_NEAR(want[i], got[i], tol) << "step " << i + 1 << std::setprecision(17);
}

// The single error line a rank printed.
std::string error_line(const std::string& output) {
  const auto pos = output.find("trainer: error:");
  if (pos == std::string::npos) return "(no error line in: " + output + ")";
  std::string line = output.substr(pos);
  return line.substr(0, line.find('\n'));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// N ranks compute what one process computes

class DistParity : public ::testing::TestWithParam<const char*> {};

TEST_P(DistParity, TwoRanksOfFourMatchOneRankOfEight) {
  const std::string type = GetParam();
  const auto one = qtune::test::temp_dir("dist-one");
  auto r = run(run_args(one, type, 8, 3));
  ASSERT_EQ(r.exit_code, 0) << r.output;

  // Through the built-in launcher; small buckets so the gradients travel in several.
  const auto two = qtune::test::temp_dir("dist-two");
  r = run(plus(run_args(two, type, 4, 3, {"dist.bucket_mb=0.001", "dist.backend=gloo"}),
               {"--nproc_per_node", "2"}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_close(losses(one), losses(two), 1e-5);
  const auto e1 = records(one, "eval"), e2 = records(two, "eval");
  ASSERT_EQ(e1.size(), e2.size());
  for (size_t i = 0; i < e1.size(); ++i) {
    EXPECT_NEAR(e1[i]["val_loss"].get<double>(), e2[i]["val_loss"].get<double>(), 1e-5);
    EXPECT_EQ(e1[i]["val_tokens"], e2[i]["val_tokens"]);
  }
  const json s = read_json(two + "/summary.json");
  EXPECT_EQ(s["dist"]["world_size"], 2);
  EXPECT_EQ(s["dist"]["backend"], "gloo");
  EXPECT_GT(s["dist"]["buckets"].get<int64_t>(), 1);
  // Every rank ended with the same trainable state (checked across ranks before saving).
  EXPECT_EQ(s["dist"]["trainable_fingerprint"].get<std::string>().size(), 16u);
  EXPECT_EQ(s["tokens"], read_json(one + "/summary.json")["tokens"]);
  // Rank 1 prefixes its log lines; only rank 0 writes outputs.
  EXPECT_NE(r.output.find("[rank 1]"), std::string::npos) << r.output;
}

INSTANTIATE_TEST_SUITE_P(TrainTypes, DistParity, ::testing::Values("full", "lora", "qlora"));

// With activation checkpointing each layer's gradients come out of its recompute (LibTorch 2.x
// runs the tensor hooks inside it too): the buckets, which hold the gradients autograd
// accumulates, must still sum exactly what one rank computes.
TEST(Dist, CheckpointedLayersOnTwoRanksMatchOneRankForEveryTrainType) {
  for (const char* type : {"full", "lora", "qlora"}) {
    SCOPED_TRACE(type);
    const std::vector<std::string> ckpt{"train.activation_checkpointing=true"};
    const auto one = qtune::test::temp_dir("dist-ckpt-one");
    auto r = run(run_args(one, type, 8, 3, ckpt));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const auto two = qtune::test::temp_dir("dist-ckpt-two");
    auto extra = ckpt;
    extra.insert(extra.end(), {"dist.bucket_mb=0.001", "dist.backend=gloo"});
    r = run(plus(run_args(two, type, 4, 3, extra), {"--nproc_per_node", "2"}));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    expect_close(losses(one), losses(two), 1e-5);
    EXPECT_GT(read_json(two + "/summary.json")["dist"]["buckets"].get<int64_t>(), 1);
  }
}

// ---------------------------------------------------------------------------------------------
// A sharded quantized base (dist.shard_base): each rank holds half of the quantized layers and
// gathers each layer when it runs, and the job computes bit for bit what two ranks holding the
// whole base compute: the same base bytes, the same arithmetic.

namespace {

std::vector<std::string> with_quant(std::vector<std::string> a, const std::string& quant) {
  for (size_t i = 0; i + 1 < a.size(); ++i)
    if (a[i] == "--quant") a[i + 1] = quant;
  return a;
}

void expect_same_job(const std::string& whole, const std::string& sharded) {
  EXPECT_EQ(losses(whole), losses(sharded));
  const auto e1 = records(whole, "eval"), e2 = records(sharded, "eval");
  ASSERT_EQ(e1.size(), e2.size());
  for (size_t i = 0; i < e1.size(); ++i) EXPECT_EQ(e1[i]["val_loss"], e2[i]["val_loss"]);
  EXPECT_EQ(qtune::test::read_file(whole + "/adapter/adapter_model.safetensors"),
            qtune::test::read_file(sharded + "/adapter/adapter_model.safetensors"));
  const json a = read_json(whole + "/summary.json"), b = read_json(sharded + "/summary.json");
  EXPECT_TRUE(a["dist"]["shard_base"].is_null());
  const json& st = b["dist"]["shard_base"];
  ASSERT_TRUE(st.is_object()) << b.dump(2);
  // The same whole base; this rank holds its half of the quantized projections', head's and
  // embedding's bytes (plus padding) and the norms, which are not sharded.
  EXPECT_EQ(a["base_weight_bytes"], b["base_weight_bytes"]);
  EXPECT_EQ(a["rank_base_weight_bytes"], a["base_weight_bytes"]);
  const int64_t full = st["full_bytes"], shard = st["shard_bytes"], layer = st["max_layer_bytes"];
  EXPECT_EQ(b["rank_base_weight_bytes"].get<int64_t>(),
            b["base_weight_bytes"].get<int64_t>() - full + shard);
  EXPECT_LE(shard, full / 2 + layer);
  EXPECT_LT(shard, full);
  EXPECT_LE(b["rank_base_weight_bytes"].get<int64_t>(),
            b["base_weight_bytes"].get<int64_t>() / 2 + layer);
  // Gathered: never more than the weight in use and the one gathered ahead.
  EXPECT_LE(st["peak_gathered_bytes"].get<int64_t>(), 2 * st["max_weight_bytes"].get<int64_t>());
  EXPECT_GT(st["prefetch_hits"].get<int64_t>(), 0) << st.dump();
  EXPECT_GT(st["gather_bytes"].get<int64_t>(), 0);
}

}  // namespace

class ShardedBase : public ::testing::TestWithParam<const char*> {};

TEST_P(ShardedBase, TwoShardedRanksMatchTwoWholeRanks) {
  const std::string quant = GetParam();
  auto job = [&](const std::string& out, std::vector<std::string> extra) {
    extra.push_back("dist.backend=gloo");
    return plus(with_quant(run_args(out, "qlora", 4, 3, extra), quant), {"--nproc_per_node", "2"});
  };
  const auto whole = qtune::test::temp_dir("shard-whole");
  auto r = run(job(whole, {}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto sharded = qtune::test::temp_dir("shard-half");
  r = run(job(sharded, {"dist.shard_base=true"}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_same_job(whole, sharded);
}

INSTANTIATE_TEST_SUITE_P(Backends, ShardedBase, ::testing::Values("nf4", "hqq", "int8"));

TEST(ShardedBaseRuns, AQuantizedDirectoryLoadsShardedAndOnlyQloraShards) {
  // A qtune-quantize directory: each rank keeps only its byte ranges of the stored state.
  const auto quantized = qtune::test::temp_dir("shard-nf4-dir");
  auto r = qtune::test::run_program({bin_path("qtune-quantize"), "--model",
                                     data_path("stories260K.bin"), "--quant", "nf4", "--out",
                                     quantized, "--overwrite"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto job = [&](const std::string& out, std::vector<std::string> extra) {
    extra.insert(extra.end(), {"dist.backend=gloo", "model.path=" + quantized});
    return plus(run_args(out, "qlora", 4, 3, extra), {"--nproc_per_node", "2"});
  };
  const auto whole = qtune::test::temp_dir("shard-dir-whole");
  r = run(job(whole, {}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto sharded = qtune::test::temp_dir("shard-dir-half");
  r = run(job(sharded, {"dist.shard_base=true"}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_same_job(whole, sharded);

  // A dense base has nothing to shard.
  r = run(run_args(qtune::test::temp_dir("shard-lora"), "lora", 4, 1, {"dist.shard_base=true"}));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  const std::string line = error_line(r.output);
  EXPECT_NE(line.find("dist.shard_base"), std::string::npos) << line;
  EXPECT_NE(line.find("qlora"), std::string::npos) << line;
}

// ---------------------------------------------------------------------------------------------
// AdamW's moments spread over the ranks (dist.shard_optimizer, ZeRO stage 1): the same job bit
// for bit, each rank stepping about half of the parameters, and the checkpoints an unsharded job
// writes.

class ShardedOptimizer : public ::testing::TestWithParam<const char*> {};

TEST_P(ShardedOptimizer, TwoRanksMatchTwoRanksHoldingEveryMoment) {
  const std::string type = GetParam();
  auto job = [&](const std::string& out, std::vector<std::string> extra) {
    extra.insert(extra.end(), {"dist.backend=gloo", "checkpoint.every=2"});
    return plus(run_args(out, type, 4, 4, extra), {"--nproc_per_node", "2"});
  };
  const auto whole = qtune::test::temp_dir("zero-whole");
  auto r = run(job(whole, {}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // qlora with its base sharded too: everything FSDP would shard.
  std::vector<std::string> shard{"dist.shard_optimizer=true"};
  if (type == "qlora") shard.push_back("dist.shard_base=true");
  const auto sharded = qtune::test::temp_dir("zero-half");
  r = run(job(sharded, shard));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto want = losses(whole);
  ASSERT_EQ(want.size(), 4u);
  EXPECT_EQ(losses(sharded), want);
  for (const char* step : {"step-2", "step-4"})
    for (const char* file :
         {"optimizer.safetensors", "adapter_model.safetensors", "trainable.safetensors"}) {
      const std::string rel = std::string("/checkpoints/") + step + "/" + file;
      if (!fs::exists(whole + rel)) continue;  // adapters or (full) the trainable weights
      EXPECT_EQ(qtune::test::read_file(whole + rel), qtune::test::read_file(sharded + rel)) << rel;
    }
  EXPECT_TRUE(read_json(whole + "/summary.json")["dist"]["shard_optimizer"].is_null());
  const json st = read_json(sharded + "/summary.json")["dist"]["shard_optimizer"];
  ASSERT_TRUE(st.is_object()) << st.dump();
  EXPECT_GT(st["owned_parameters"].get<int64_t>(), 0);
  EXPECT_LT(st["owned_parameters"].get<int64_t>(), st["parameters"].get<int64_t>());
  EXPECT_GT(st["owned_parameter_bytes"].get<int64_t>(), 0);
  EXPECT_LT(st["owned_parameter_bytes"].get<int64_t>(), st["parameter_bytes"].get<int64_t>());

  // Resumed from the unsharded job's step 2, each rank keeping only its own moments, the
  // sharded job continues with the same losses.
  const auto resumed = qtune::test::temp_dir("zero-resume");
  r = run(plus(job(resumed, shard), {"--resume", whole + "/checkpoints/step-2"}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(losses(resumed), std::vector<double>(want.begin() + 2, want.end()));
}

INSTANTIATE_TEST_SUITE_P(TrainTypes, ShardedOptimizer, ::testing::Values("full", "lora", "qlora"));

TEST(Dist, ThreeRanksOverAnUnevenEpochMatchOneRank) {
  // A short training file: a global batch of 6 does not divide its examples, and 7 steps cross
  // the epoch boundary (checked below); the short last eval batch is split 3 ways too.
  const auto dir = qtune::test::temp_dir("dist-data");
  const std::string text = qtune::test::read_file(data_path("tinyshakespeare.txt"));
  std::ofstream(dir + "/train.txt") << text.substr(0, 1800);
  std::ofstream(dir + "/val.txt") << text.substr(10000, 1500);
  const std::vector<std::string> data{"data.path=" + dir + "/train.txt",
                                      "data.val_path=" + dir + "/val.txt"};
  const auto one = qtune::test::temp_dir("dist-uneven-one");
  auto r = run(run_args(one, "lora", 6, 7, data));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto three = qtune::test::temp_dir("dist-uneven-three");
  r = run(plus(run_args(three, "lora", 2, 7, data), {"--nproc_per_node", "3"}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_close(losses(one), losses(three), 1e-5);
  const auto t = records(three, "train");
  ASSERT_FALSE(t.empty());
  EXPECT_GE(t.back()["epoch"].get<int64_t>(), 1) << "the run never crossed an epoch";
  EXPECT_NEAR(read_json(one + "/summary.json")["final_val_loss"].get<double>(),
              read_json(three + "/summary.json")["final_val_loss"].get<double>(), 1e-5);
}

// ---------------------------------------------------------------------------------------------
// Faults

TEST(Dist, SigtermOrALostRankStopsEveryRankAndResumeMatches) {
  const int64_t steps = 5;
  const auto ref = qtune::test::temp_dir("dist-ref");
  auto r = run(plus(run_args(ref, "lora", 4, steps), {"--nproc_per_node", "2"}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto want = losses(ref);
  ASSERT_EQ(want.size(), static_cast<size_t>(steps));

  // SIGTERM to rank 1 alone while it is paused after step 2: both ranks finish step 2, rank 0
  // saves, both exit 0.
  const auto a = qtune::test::temp_dir("dist-term");
  const auto ckpt = std::vector<std::string>{"checkpoint.every=1"};
  auto ranks = start_ranks({run_args(a, "lora", 4, steps, ckpt), run_args(a, "lora", 4, steps, ckpt)},
                           {{}, {"QTUNE_DEBUG_PAUSE=step@2"}}, qtune::free_local_port());
  ASSERT_TRUE(wait_for_file(a + "/.qtune-debug-paused", kLimitS))
      << qtune::test::read_file(ranks.logs[1]);
  kill(ranks.pids[1], SIGTERM);
  auto codes = wait_all(ranks);
  EXPECT_EQ(codes[0], 0) << qtune::test::read_file(ranks.logs[0]);
  EXPECT_EQ(codes[1], 0) << qtune::test::read_file(ranks.logs[1]);
  EXPECT_EQ(qtune::test::read_file(a + "/checkpoints/latest"), "step-2\n");
  EXPECT_TRUE(read_json(a + "/summary.json")["stopped_early"].get<bool>());
  r = run(plus(run_args(a, "lora", 4, steps, ckpt), {"--nproc_per_node", "2", "--resume", "latest"}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(losses(a), want);

  // SIGKILL of rank 1 while it is paused after step 3 (rank 0 waits for it to agree whether to
  // stop, before saving step 3): rank 0 exits non-zero naming rank 1, well within
  // dist.timeout_s; resuming the job from the last checkpoint (step 2) gives the uninterrupted
  // losses.
  const auto b = qtune::test::temp_dir("dist-kill");
  ranks = start_ranks({run_args(b, "lora", 4, steps, ckpt), run_args(b, "lora", 4, steps, ckpt)},
                      {{}, {"QTUNE_DEBUG_PAUSE=step@3"}}, qtune::free_local_port());
  ASSERT_TRUE(wait_for_file(b + "/.qtune-debug-paused", kLimitS))
      << qtune::test::read_file(ranks.logs[1]);
  const auto t0 = std::chrono::steady_clock::now();
  kill(ranks.pids[1], SIGKILL);
  codes = wait_all(ranks);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(codes[1], 128 + SIGKILL);
  EXPECT_NE(codes[0], 0);
  EXPECT_NE(codes[0], -1) << "rank 0 hung";
  EXPECT_LT(took, 20.0);
  const std::string line = error_line(qtune::test::read_file(ranks.logs[0]));
  EXPECT_EQ(line.rfind("trainer: error: dist: lost rank 1 (", 0), 0u) << line;
  EXPECT_EQ(qtune::test::read_file(b + "/checkpoints/latest"), "step-2\n");
  EXPECT_FALSE(fs::exists(b + "/summary.json"));
  r = run(plus(run_args(b, "lora", 4, steps, ckpt), {"--nproc_per_node", "2", "--resume", "latest"}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(losses(b), want);
}

TEST(Dist, ARankWithAnotherRecipeIsRefusedNamingTheKey) {
  const auto out = qtune::test::temp_dir("dist-mismatch");
  auto ranks = start_ranks({run_args(out, "lora", 4, 2), run_args(out, "lora", 4, 2, {"--lr", "0.002"})},
                           {{}, {}}, qtune::free_local_port());
  const auto codes = wait_all(ranks);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(codes[i], 2) << qtune::test::read_file(ranks.logs[i]);
    const std::string line = error_line(qtune::test::read_file(ranks.logs[i]));
    EXPECT_NE(line.find("dist: rank 1 disagrees with rank 0 on the run: recipe.train.lr = 0.002 "
                        "on rank 1, 0.003 on rank 0"),
              std::string::npos)
        << line;
  }
  EXPECT_FALSE(fs::exists(out + "/metrics.jsonl"));
}

TEST(Dist, AnUnreachableMasterIsOneLineExitTwo) {
  const int port = qtune::free_local_port();  // nobody listens there
  const auto out = qtune::test::temp_dir("dist-nomaster");
  auto r = run(run_args(out, "lora", 4, 1, {"dist.timeout_s=2"}),
               {"RANK=1", "WORLD_SIZE=2", "MASTER_ADDR=127.0.0.1", "MASTER_PORT=" + std::to_string(port)});
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(error_line(r.output).rfind("trainer: error: rank 1: dist: rank 1 cannot reach the master 127.0.0.1:" +
                                           std::to_string(port) + " (MASTER_ADDR=127.0.0.1, MASTER_PORT=" +
                                           std::to_string(port) + ") within 2 s: ",
                                       0),
            0u)
      << r.output;
}

// dist.backend is what the group is built with: nccl in a LibTorch without CUDA, or on the CPU
// device of one with it, is refused by every rank with one line, before any step.
TEST(Dist, NcclWithoutCudaIsRefused) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "a GPU is present: nccl may run";
  const auto out = qtune::test::temp_dir("dist-nccl");
  auto r = run(plus(run_args(out, "lora", 4, 1, {"dist.backend=nccl"}), {"--nproc_per_node", "2"}));
  EXPECT_EQ(r.exit_code, 2) << r.output;
#ifdef QTUNE_TEST_WITH_NCCL
  const std::string expected =
      "trainer: error: dist.backend nccl needs a cuda device, got device \"cpu\"";
#else
  const std::string expected =
      "trainer: error: dist.backend is nccl, but this build's LibTorch has no CUDA/NCCL; use gloo";
#endif
  EXPECT_NE(r.output.find(expected), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(out + "/metrics.jsonl"));
}

TEST(Dist, SlurmRanksTakeTheMasterFromTheRecipe) {
  const int port = qtune::free_local_port();
  const auto out = qtune::test::temp_dir("dist-slurm");
  const auto args = run_args(out, "lora", 4, 2,
                             {"dist.master_addr=127.0.0.1", "dist.master_port=" + std::to_string(port)});
  Ranks ranks;
  for (int i = 0; i < 2; ++i) {
    ranks.logs.push_back(qtune::test::temp_dir("slurm") + "/out.txt");
    ranks.pids.push_back(qtune::test::spawn(
        args,
        {"SLURM_PROCID=" + std::to_string(i), "SLURM_NTASKS=2", "SLURM_LOCALID=" + std::to_string(i),
         "SLURM_NTASKS_PER_NODE=2"},
        ranks.logs.back()));
  }
  const auto codes = wait_all(ranks);
  for (int i = 0; i < 2; ++i) EXPECT_EQ(codes[i], 0) << qtune::test::read_file(ranks.logs[i]);
  EXPECT_EQ(read_json(out + "/summary.json")["dist"]["world_size"], 2);
  EXPECT_EQ(records(out, "train").size(), 2u);
}

// Two "machines" of one rank each, as torchrun --nnodes 2 --nproc_per_node 1 starts them, on
// loopback: LOCAL_WORLD_SIZE=1 below WORLD_SIZE=2 takes the multi-node set-up (the Gloo device
// from GLOO_SOCKET_IFNAME, not the single-machine loopback default), and the job still computes
// what one process with the global batch computes.
TEST(Dist, TwoNodesOfOneRankMatchOneRank) {
  const auto one = qtune::test::temp_dir("dist-nodes-one");
  auto r = run(run_args(one, "qlora", 8, 2));
  ASSERT_EQ(r.exit_code, 0) << r.output;

  const int port = qtune::free_local_port();
  const auto two = qtune::test::temp_dir("dist-nodes-two");
  Ranks ranks;
  for (int i = 0; i < 2; ++i) {
    ranks.logs.push_back(qtune::test::temp_dir("node") + "/out.txt");
    ranks.pids.push_back(qtune::test::spawn(
        run_args(two, "qlora", 4, 2),
        {"RANK=" + std::to_string(i), "WORLD_SIZE=2", "LOCAL_RANK=0", "LOCAL_WORLD_SIZE=1",
         "GROUP_RANK=" + std::to_string(i), "MASTER_ADDR=127.0.0.1",
         "MASTER_PORT=" + std::to_string(port), "GLOO_SOCKET_IFNAME=lo"},
        ranks.logs.back()));
  }
  const auto codes = wait_all(ranks);
  for (int i = 0; i < 2; ++i) ASSERT_EQ(codes[i], 0) << qtune::test::read_file(ranks.logs[i]);
  expect_close(losses(one), losses(two), 1e-5);
  const json s = read_json(two + "/summary.json");
  EXPECT_EQ(s["dist"]["world_size"], 2);
  EXPECT_EQ(s["dist"]["local_world_size"], 1) << s["dist"].dump();
}
