// The process-group layer with real processes on loopback: each test forks its ranks (before
// anything in this process starts threads) and bounds them in time. Sums and gradient buckets
// equal the serial sum; a disagreement at start-up, a lost rank, a port in use, an unreachable
// master and mismatched world sizes each give one line naming what is wrong. Buckets sent during
// backward (grad accumulation, a micro-batch one rank skips) sum what the serial sum gives. Also:
// the world from torchrun/SLURM environments, per-rank data shares against one process's
// batches, the local launcher's environment, exit status and signal forwarding, and AdamW's
// moments sharded over the ranks (ZeRO-1) ending where one AdamW over everything ends.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include "qtune/data_shard.h"
#include "qtune/error.h"
#include "qtune/gradient_buckets.h"
#include "qtune/launcher.h"
#include "qtune/optimizer_shards.h"
#include "qtune/process_group.h"
#include "test_util.h"

namespace fs = std::filesystem;
using qtune::DistConfig;
using qtune::ProcessGroup;
using qtune::WorldInfo;

namespace {

struct RankResult {
  int code = -1;  // exit code; 2 = UserError, 1 = other exception, -1 = killed at the deadline
  std::string message;
};

// Forks `n` ranks running fn(rank) and waits at most `limit_s` for all of them. A rank reports
// by its exit code and the message it leaves in a file (it never returns into gtest).
std::vector<RankResult> run_ranks(int n, const std::function<void(int)>& fn,
                                  double limit_s = 40) {
  const std::string dir = qtune::test::temp_dir("pg");
  std::vector<pid_t> pids;
  for (int r = 0; r < n; ++r) {
    std::fflush(nullptr);
    const pid_t pid = fork();
    if (pid == 0) {
      int code = 0;
      std::string msg = "ok";
      try {
        fn(r);
      } catch (const qtune::UserError& e) {
        code = 2;
        msg = e.what();
      } catch (const std::exception& e) {
        code = 1;
        msg = e.what();
      }
      std::ofstream(dir + "/rank" + std::to_string(r)) << msg;
      _exit(code);  // not exit(): the parent's atexit handlers (temp dirs) are not ours
    }
    pids.push_back(pid);
  }
  std::vector<RankResult> out(n);
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(limit_s * 1000));
  for (int r = 0; r < n; ++r) {
    int status = 0;
    while (waitpid(pids[r], &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        for (int k = r; k < n; ++k) kill(pids[k], SIGKILL);
        waitpid(pids[r], &status, 0);
        status = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    out[r].code = status == -1 ? -1 : (WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    std::ifstream in(dir + "/rank" + std::to_string(r));
    std::getline(in, out[r].message);
  }
  return out;
}

WorldInfo local_world(int rank, int n, int port) {
  WorldInfo w;
  w.rank = rank;
  w.world_size = n;
  w.local_rank = rank;
  w.local_world_size = n;
  w.master_addr = "127.0.0.1";
  w.master_port = port;
  w.launcher = "torchrun";
  w.master_addr_from = "MASTER_ADDR";
  w.master_port_from = "MASTER_PORT";
  return w;
}

DistConfig quick(double timeout_s = 20) {
  DistConfig c;
  c.timeout_s = timeout_s;
  return c;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The world from the environment

TEST(WorldFromEnvironment, ReadsTorchrunVariables) {
  const auto w = qtune::world_from_environment(
      {{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"},
       {"MASTER_ADDR", "node0"}, {"MASTER_PORT", "1234"}},
      DistConfig{});
  EXPECT_EQ(w.launcher, "torchrun");
  EXPECT_EQ(w.rank, 3);
  EXPECT_EQ(w.world_size, 4);
  EXPECT_EQ(w.local_rank, 1);
  EXPECT_EQ(w.local_world_size, 2);
  EXPECT_EQ(w.master_addr, "node0");
  EXPECT_EQ(w.master_port, 1234);
  EXPECT_FALSE(w.agent_store);

  const auto agent = qtune::world_from_environment(
      {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "5"},
       {"TORCHELASTIC_USE_AGENT_STORE", "True"}, {"TORCHELASTIC_RESTART_COUNT", "2"}},
      DistConfig{});
  EXPECT_TRUE(agent.agent_store);
  EXPECT_EQ(agent.store_prefix, "/worker/attempt_2");
}

TEST(WorldFromEnvironment, ReadsSlurmWithTheMasterFromTheRecipe) {
  DistConfig c;
  c.master_addr = "login1";
  c.master_port = 29600;
  const auto w = qtune::world_from_environment(
      {{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
       {"SLURM_TASKS_PER_NODE", "4(x2)"}},
      c);
  EXPECT_EQ(w.launcher, "slurm");
  EXPECT_EQ(w.rank, 5);
  EXPECT_EQ(w.world_size, 8);
  EXPECT_EQ(w.local_rank, 1);
  EXPECT_EQ(w.local_world_size, 4);
  EXPECT_EQ(w.master_addr, "login1");
  EXPECT_EQ(w.master_port, 29600);
  EXPECT_EQ(w.master_addr_from, "dist.master_addr");
}

TEST(WorldFromEnvironment, NoLauncherIsAWorldOfOne) {
  const auto w = qtune::world_from_environment({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}},
                                               DistConfig{});
  EXPECT_EQ(w.launcher, "single");
  EXPECT_EQ(w.world_size, 1);
  EXPECT_EQ(w.rank, 0);
}

TEST(WorldFromEnvironment, BadValuesNameTheVariable) {
  auto error = [](const qtune::Environment& env) {
    try {
      qtune::world_from_environment(env, DistConfig{});
    } catch (const qtune::UserError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(error({{"RANK", "x"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}}),
            "dist: RANK must be an integer >= 0, got 'x'");
  EXPECT_EQ(error({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}}),
            "dist: RANK 2 is not below WORLD_SIZE 2");
  EXPECT_EQ(error({{"RANK", "0"}}),
            "dist: RANK and WORLD_SIZE must be set together (RANK is set, the other is not)");
  EXPECT_EQ(error({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"},
                   {"MASTER_PORT", "70000"}}),
            "dist: MASTER_PORT must be in [1, 65535], got 70000");
  EXPECT_EQ(error({{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}}),
            "dist: slurm started 2 ranks but no master address is known: set MASTER_ADDR or "
            "dist.master_addr to the host of rank 0 (e.g. the first name of `scontrol show "
            "hostnames $SLURM_JOB_NODELIST`)");
}

TEST(DistConfig, RecipeValuesAreChecked) {
  qtune::Json r = {{"dist",
                    {{"backend", "mpi"},
                     {"timeout_s", 10.0},
                     {"master_addr", ""},
                     {"master_port", 29500},
                     {"bucket_mb", 25.0}}}};
  try {
    qtune::dist_config_from_recipe(r);
    FAIL() << "no error";
  } catch (const qtune::UserError& e) {
    EXPECT_STREQ(e.what(), "dist.backend must be gloo, nccl or auto, got \"mpi\"");
  }
  r["dist"]["backend"] = "gloo";
  r["dist"]["timeout_s"] = 0.0;
  EXPECT_THROW(qtune::dist_config_from_recipe(r), qtune::UserError);
  r["dist"]["timeout_s"] = 5.0;
  EXPECT_EQ(qtune::dist_config_from_recipe(r).timeout_s, 5.0);
}

// ---------------------------------------------------------------------------------------------
// Collectives across processes

TEST(ProcessGroup, SumsAndGradientBucketsEqualTheSerialSum) {
  const int port = qtune::free_local_port();
  const int n = 3;
  auto res = run_ranks(n, [&](int r) {
    auto g = ProcessGroup::join(local_world(r, n, port), quick());
    QTUNE_CHECK(g->backend() == "gloo", "backend ", g->backend());
    auto counts = torch::tensor({int64_t{r + 1}, int64_t{10}}, torch::kInt64);
    g->all_reduce_sum(counts, "counts");
    QTUNE_CHECK(counts[0].item<int64_t>() == 6 && counts[1].item<int64_t>() == 30, "counts ",
                counts);
    // Three parameters, two dtypes; a 64-byte bucket forces several buckets. Rank 1 has no
    // gradient for p2 (it contributes zeros and still receives the sum).
    std::vector<torch::Tensor> params{torch::zeros({3, 5}).requires_grad_(),
                                      torch::zeros({7}, torch::kFloat64).requires_grad_(),
                                      torch::zeros({2, 2}).requires_grad_()};
    for (size_t i = 0; i < params.size(); ++i) {
      if (r == 1 && i == 2) continue;
      params[i].mutable_grad() =
          torch::arange(params[i].numel(), params[i].options().requires_grad(false))
              .reshape(params[i].sizes()) *
          (r + 1);
    }
    qtune::GradientBuckets buckets(params, 64);
    QTUNE_CHECK(buckets.num_buckets() == 3, "buckets ", buckets.num_buckets());
    buckets.all_reduce(*g);
    for (size_t i = 0; i < params.size(); ++i) {
      auto base = torch::arange(params[i].numel(), params[i].options().requires_grad(false))
                      .reshape(params[i].sizes());
      auto want = base * (i == 2 ? 4 : 6);  // 1 + 2 + 3, without rank 1's for p2
      QTUNE_CHECK(torch::equal(params[i].grad(), want), "param ", i, " got ", params[i].grad());
    }
    g->check_agreement("recipe", {{"train", {{"lr", 0.001}}}});
    g->finish();
  });
  for (int r = 0; r < n; ++r) EXPECT_EQ(res[r].code, 0) << "rank " << r << ": " << res[r].message;
}

TEST(ProcessGroup, DisagreementIsRefusedNamingTheRankAndKey) {
  const int port = qtune::free_local_port();
  auto res = run_ranks(2, [&](int r) {
    auto g = ProcessGroup::join(local_world(r, 2, port), quick());
    g->check_agreement("recipe", {{"seed", 1}, {"train", {{"lr", r == 0 ? 0.001 : 0.002}}}});
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(res[r].code, 2) << res[r].message;
    EXPECT_EQ(res[r].message,
              "dist: rank 1 disagrees with rank 0 on the recipe: train.lr = 0.002 on rank 1, "
              "0.001 on rank 0; every rank must run the same recipe and files");
  }
}

TEST(ProcessGroup, ALostRankIsNamedWithinTheTimeout) {
  const int port = qtune::free_local_port();
  const auto t0 = std::chrono::steady_clock::now();
  auto res = run_ranks(3, [&](int r) {
    auto g = ProcessGroup::join(local_world(r, 3, port), quick(20));
    auto t = torch::ones({1000});
    g->all_reduce_sum(t, "warm-up");
    if (r == 2) raise(SIGKILL);
    for (int i = 0; i < 3; ++i) g->all_reduce_sum(t, "the gradient all-reduce");
  });
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(res[2].code, 128 + SIGKILL);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(res[r].code, 2) << res[r].message;
    EXPECT_EQ(res[r].message.rfind("dist: lost rank 2 (", 0), 0u) << res[r].message;
    EXPECT_NE(res[r].message.find("during the gradient all-reduce"), std::string::npos)
        << res[r].message;
  }
  EXPECT_LT(took, 30.0);  // bounded by dist.timeout_s (20) plus the diagnosis
}

TEST(ProcessGroup, APortInUseIsOneLine) {
  // Something else listens on the port rank 0 would host the store on.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = 0;
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(listen(fd, 4), 0);
  socklen_t len = sizeof addr;
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const int port = ntohs(addr.sin_port);
  auto res = run_ranks(1, [&](int) { ProcessGroup::join(local_world(0, 2, port), quick(5)); });
  close(fd);
  EXPECT_EQ(res[0].code, 2);
  EXPECT_EQ(res[0].message, "dist: rank 0 cannot listen on port " + std::to_string(port) +
                                " (MASTER_ADDR=127.0.0.1, MASTER_PORT=" + std::to_string(port) +
                                "): the address is already in use; choose a free port");
}

TEST(ProcessGroup, AnUnreachableMasterIsOneLine) {
  const int port = qtune::free_local_port();  // nobody listens there
  auto res = run_ranks(1, [&](int) { ProcessGroup::join(local_world(1, 2, port), quick(2)); });
  EXPECT_EQ(res[0].code, 2);
  const std::string want = "dist: rank 1 cannot reach the master 127.0.0.1:" +
                           std::to_string(port) + " (MASTER_ADDR=127.0.0.1, MASTER_PORT=" +
                           std::to_string(port) + ") within 2 s: ";
  EXPECT_EQ(res[0].message.substr(0, want.size()), want) << res[0].message;

  auto unknown = run_ranks(1, [&](int) {
    WorldInfo w = local_world(1, 2, port);
    w.master_addr = "no-such-host.invalid";
    ProcessGroup::join(w, quick(2));
  });
  EXPECT_EQ(unknown[0].code, 2);
  EXPECT_EQ(unknown[0].message.rfind("dist: rank 1 cannot reach the master no-such-host.invalid:", 0),
            0u)
      << unknown[0].message;
}

TEST(ProcessGroup, MismatchedWorldSizesAreRefused) {
  const int port = qtune::free_local_port();
  auto res = run_ranks(2, [&](int r) {
    ProcessGroup::join(local_world(r, r == 0 ? 2 : 3, port), quick(10));
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(res[r].code, 2) << res[r].message;
    EXPECT_EQ(res[r].message, "dist: mismatched world sizes: rank 0 has WORLD_SIZE 2, rank 1 has 3");
  }
}

// ---------------------------------------------------------------------------------------------
// Gradient buckets sent during backward

namespace {

// A small model with what the trainer's have: two dtypes, a weight used twice in one graph (as a
// tied embedding is) and a parameter that never gets a gradient.
std::vector<torch::Tensor> toy_params() {
  torch::manual_seed(7);
  return {torch::randn({6, 4}).requires_grad_(),                   // emb (used twice)
          torch::randn({5, 4}).requires_grad_(),                   // w1
          torch::randn({5}).requires_grad_(),                      // b1
          torch::randn({5, 4}, torch::kFloat64).requires_grad_(),  // w2
          torch::zeros({3}).requires_grad_()};                     // unused
}

std::vector<torch::Tensor> clones(const std::vector<torch::Tensor>& ps) {
  std::vector<torch::Tensor> out;
  for (const auto& p : ps) out.push_back(p.detach().clone().requires_grad_());
  return out;
}

// Rank r's micro-batch m of step s, scaled by 1 / grad accumulation.
torch::Tensor toy_loss(const std::vector<torch::Tensor>& p, int64_t step, int64_t micro,
                       int64_t rank) {
  torch::manual_seed(1000 * step + 10 * micro + rank);
  const auto x = torch::randn({2, 4});
  const auto h = torch::tanh(torch::matmul(x, p[1].t()) + p[2]);
  const auto h2 = torch::matmul(h, p[3].to(torch::kFloat32));
  const auto logits = torch::matmul(h2 + x, p[0].t());
  return (logits.pow(2).mean() + 0.1 * p[0].sum()) * 0.5;
}

void clear_grads(std::vector<torch::Tensor>& ps, int64_t step) {
  for (auto& p : ps) {
    if (step % 2 == 1 && p.grad().defined())
      p.mutable_grad().zero_();  // torch 1.13's zero_grad()
    else
      p.mutable_grad() = torch::Tensor();  // 2.x's (set_to_none)
  }
}

// Two ranks, grad accumulation 2, five 64-byte buckets, four steps; skips(rank, step, micro)
// says which micro-batches a rank has no targets for. Each step, the gradients summed by
// buckets armed for the last backward a rank runs must equal, bit for bit, both the unarmed
// path's (all sent after backward) and the sum of both ranks' gradients computed here serially.
void check_overlapped_sums(const std::function<bool(int, int64_t, int64_t)>& skips) {
  const int port = qtune::free_local_port();
  auto res = run_ranks(2, [&](int r) {
    auto g = ProcessGroup::join(local_world(r, 2, port), quick());
    auto armed = toy_params(), unarmed = clones(armed), serial = clones(armed);
    qtune::GradientBuckets a(armed, 64), b(unarmed, 64);
    QTUNE_CHECK(a.num_buckets() == 5, "buckets ", a.num_buckets());  // bucket k: param 4 - k
    // The parameter whose gradient came last in the latest backward (hooks run in order of
    // registration: these after the buckets').
    int64_t last_arrival = -1;
    for (int64_t i = 0; i < static_cast<int64_t>(armed.size()); ++i)
      armed[i].register_hook([&last_arrival, i](const torch::Tensor&) { last_arrival = i; });
    bool calibrated = false;
    for (int64_t step = 1; step <= 4; ++step) {
      clear_grads(armed, step);
      clear_grads(unarmed, step);
      int64_t last = -1;
      for (int64_t m = 0; m < 2; ++m)
        if (!skips(r, step, m)) last = m;
      for (int64_t m = 0; m < 2; ++m) {
        if (skips(r, step, m)) continue;
        auto loss = toy_loss(armed, step, m, r);
        if (m == last) a.arm(*g);
        loss.backward();
      }
      a.finish(*g);
      // The first armed backward learns how many gradients each parameter gets; after that, a
      // bucket goes at the first hook after its last gradient was added: every bucket before
      // the one the backward's last gradient completes is sent before backward returns.
      const int64_t early = last < 0 || !calibrated ? 0 : a.num_buckets() - 1 - last_arrival;
      QTUNE_CHECK(a.sent_during_backward() == early, "step ", step, ": ",
                  a.sent_during_backward(), " buckets sent during backward, expected ", early);
      calibrated = calibrated || last >= 0;

      for (int64_t m = 0; m < 2; ++m)
        if (!skips(r, step, m)) toy_loss(unarmed, step, m, r).backward();
      b.all_reduce(*g);
      QTUNE_CHECK(b.sent_during_backward() == 0, "unarmed buckets were sent during backward");

      std::vector<torch::Tensor> want;
      for (auto& p : serial) want.push_back(torch::zeros_like(p).detach());
      for (int rank = 0; rank < 2; ++rank) {
        clear_grads(serial, step);
        for (int64_t m = 0; m < 2; ++m)
          if (!skips(rank, step, m)) toy_loss(serial, step, m, rank).backward();
        for (size_t i = 0; i < serial.size(); ++i)
          if (serial[i].grad().defined()) want[i] = want[i] + serial[i].grad();
      }
      for (size_t i = 0; i < armed.size(); ++i) {
        // Gradients live in the buckets: no second copy beside them.
        QTUNE_CHECK(a.holds_gradient(i) && b.holds_gradient(i), "step ", step, " param ", i,
                    ": .grad is not its bucket slot");
        QTUNE_CHECK(torch::equal(armed[i].grad(), unarmed[i].grad()), "step ", step, " param ", i,
                    ": armed ", armed[i].grad(), " unarmed ", unarmed[i].grad());
        QTUNE_CHECK(torch::equal(armed[i].grad(), want[i]), "step ", step, " param ", i,
                    ": armed ", armed[i].grad(), " serial sum ", want[i]);
      }
    }
    g->finish();
  });
  for (int r = 0; r < 2; ++r) EXPECT_EQ(res[r].code, 0) << "rank " << r << ": " << res[r].message;
}

}  // namespace

TEST(GradientBuckets, SentDuringBackwardWithGradAccumulationEqualTheSerialSum) {
  check_overlapped_sums([](int, int64_t, int64_t) { return false; });
}

TEST(GradientBuckets, AMicroBatchSkippedOnOneRankNeitherDeadlocksNorChangesTheSum) {
  // Rank 1 has no targets in its last micro-batch of step 1 (it arms the first instead), in its
  // first of step 2 (its armed backward starts from undefined gradients), in neither of step 3
  // and in both of step 4 (it arms nothing: every bucket goes after backward while rank 0 sends
  // them during its own).
  check_overlapped_sums([](int rank, int64_t step, int64_t micro) {
    if (rank != 1) return false;
    return (step == 1 && micro == 1) || (step == 2 && micro == 0) || step == 4;
  });
}

// ---------------------------------------------------------------------------------------------
// Per-rank data shares

namespace {

// Example i holds tokens i*T .. i*T+T-1; targets ignore every third position of odd examples.
class CountingDataset : public qtune::TokenDataset {
 public:
  explicit CountingDataset(int64_t n, int64_t t = 4) : n_(n), t_(t) { stats_.source = "counting"; }
  int64_t size() const override { return n_; }
  int64_t seq_len() const override { return t_; }
  qtune::Example get(int64_t i) const override {
    qtune::Example e;
    e.tokens.resize(t_);
    e.targets.resize(t_);
    fill(i, e.tokens.data(), e.targets.data());
    return e;
  }
  int64_t fill(int64_t i, int64_t* tokens, int64_t* targets) const override {
    int64_t n = 0;
    for (int64_t k = 0; k < t_; ++k) {
      tokens[k] = i * t_ + k;
      targets[k] = (i % 2 == 1 && k % 3 == 0) ? qtune::kIgnoreIndex : tokens[k] + 1;
      n += targets[k] != qtune::kIgnoreIndex;
    }
    return n;
  }
  const qtune::DatasetStats& stats() const override { return stats_; }

 private:
  int64_t n_, t_;
  qtune::DatasetStats stats_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// AdamW's moments spread over the ranks (dist.shard_optimizer)

TEST(OptimizerShards, EachRankStepsItsOwnAndAllEndWithWhatOneAdamWComputes) {
  const int port = qtune::free_local_port();
  const int n = 3;
  auto res = run_ranks(n, [&](int r) {
    auto g = ProcessGroup::join(local_world(r, n, port), quick());
    // Five parameters of two dtypes; 7-byte chunks split tensors across exchanges.
    auto make = [] {
      std::vector<torch::Tensor> v{torch::randn({4, 3}), torch::randn({5}, torch::kFloat64),
                                   torch::randn({2, 2}), torch::randn({9}), torch::randn({1})};
      for (auto& t : v) t.requires_grad_();
      return v;
    };
    torch::manual_seed(7);
    auto params = make();
    torch::manual_seed(7);
    auto reference = make();
    const auto options = torch::optim::AdamWOptions(0.1).weight_decay(0.01);
    torch::optim::AdamW whole(reference, options);
    qtune::OptimizerShards shards(params, r, n, /*chunk_bytes=*/7);
    torch::optim::AdamW mine(shards.owned(), options);
    // Every parameter has one owner and each rank owns some.
    auto owners = torch::zeros({static_cast<int64_t>(params.size())}, torch::kInt64);
    for (size_t i = 0; i < params.size(); ++i) owners[i] = shards.owns(i) ? 1 : 0;
    QTUNE_CHECK(owners.sum().item<int64_t>() > 0, "rank ", r, " owns nothing");
    g->all_reduce_sum(owners, "owners");
    QTUNE_CHECK(torch::equal(owners, torch::ones_like(owners)), "owners ", owners);
    for (int step = 1; step <= 2; ++step) {
      for (size_t i = 0; i < params.size(); ++i) {
        auto grad = torch::full_like(params[i], 0.5 * (i + 1) * step).detach();
        params[i].mutable_grad() = grad.clone();
        reference[i].mutable_grad() = grad.clone();
      }
      whole.step();
      mine.step();
      shards.share_parameters(*g);
      for (size_t i = 0; i < params.size(); ++i)
        QTUNE_CHECK(torch::equal(params[i], reference[i]), "step ", step, " param ", i, ": ",
                    params[i], " against ", reference[i]);
    }
    // Rank 0 gathers every owner's moments: the state of the one AdamW over everything.
    auto gathered = shards.gather_state(*g, mine);
    QTUNE_CHECK((r == 0) == (gathered != nullptr), "rank ", r, " gathered state");
    if (gathered) {
      for (size_t i = 0; i < params.size(); ++i) {
        const auto* a = qtune::adamw_state(*gathered, params[i]);
        const auto* b = qtune::adamw_state(whole, reference[i]);
        QTUNE_CHECK(a && b && a->step() == 2 && b->step() == 2, "param ", i, ": no state");
        QTUNE_CHECK(torch::equal(a->exp_avg(), b->exp_avg()) &&
                        torch::equal(a->exp_avg_sq(), b->exp_avg_sq()),
                    "param ", i, ": gathered moments differ");
      }
    }
    g->finish();
  });
  for (int r = 0; r < n; ++r) EXPECT_EQ(res[r].code, 0) << "rank " << r << ": " << res[r].message;
}

TEST(OptimizerShards, FewerParametersThanRanksIsRefusedNamingTheKey) {
  std::vector<torch::Tensor> params{torch::zeros({2}).requires_grad_(),
                                    torch::zeros({3}).requires_grad_()};
  try {
    qtune::OptimizerShards shards(params, 0, 3);
    FAIL() << "accepted";
  } catch (const qtune::UserError& e) {
    EXPECT_STREQ(e.what(),
                 "dist.shard_optimizer: 2 trainable parameters cannot be spread over 3 ranks "
                 "(each must own at least one); set dist.shard_optimizer=false");
  }
}

TEST(ShardedLoader, TwoRanksOfFourSeeTheBatchesOfOneRankOfEight) {
  auto data = std::make_shared<CountingDataset>(37);  // 4 global batches of 8 per epoch, 5 left
  qtune::DataLoader one(data, 8, 7);
  qtune::ShardedLoader r0(data, 4, 0, 2, 7), r1(data, 4, 1, 2, 7);
  for (int step = 0; step < 11; ++step) {  // across two epoch boundaries
    auto whole = one.next();
    auto a = r0.next(), b = r1.next();
    ASSERT_TRUE(torch::equal(torch::cat({a.tokens, b.tokens}), whole.tokens)) << step;
    ASSERT_TRUE(torch::equal(torch::cat({a.targets, b.targets}), whole.targets)) << step;
    EXPECT_EQ(a.num_targets + b.num_targets, whole.num_targets);
    EXPECT_EQ(r0.state().to_json(), one.state().to_json());
  }
  // A position saved by 2 ranks x 4 resumes 1 rank x 8 (the same global batch) and vice versa.
  qtune::DataLoader resumed(data, 8, 7);
  resumed.restore(r1.state());
  EXPECT_TRUE(torch::equal(resumed.next().tokens, torch::cat({r0.next().tokens, r1.next().tokens})));
  qtune::ShardedLoader single(data, 8, 0, 1, 7);
  single.restore(one.state());
  EXPECT_TRUE(torch::equal(single.next().tokens, one.next().tokens));
}

TEST(ShardedLoader, TooFewExamplesForOneGlobalBatchNamesTheWorld) {
  auto data = std::make_shared<CountingDataset>(7);
  try {
    qtune::ShardedLoader l(data, 4, 0, 2, 0);
    FAIL() << "no error";
  } catch (const qtune::UserError& e) {
    EXPECT_STREQ(e.what(),
                 "'counting' gives 7 examples of 4 tokens, fewer than one global batch of 2 ranks "
                 "x train.batch_size 4; lower the batch size or data.seq_len, or add data");
  }
}

TEST(EvalShares, ThreeRanksCoverOneProcessesEvalBatchesOnce) {
  CountingDataset data(23);
  for (int64_t max_batches : {0, 2}) {
    std::vector<torch::Tensor> whole;
    qtune::for_each_eval_batch(data, 6, max_batches,
                               [&](const qtune::Batch& b) { whole.push_back(b.tokens); });
    std::vector<std::vector<torch::Tensor>> shares(3);
    int64_t targets = 0;
    for (int r = 0; r < 3; ++r)
      qtune::for_each_eval_share(data, 2, r, 3, max_batches, [&](const qtune::Batch& b) {
        shares[r].push_back(b.tokens);
        targets += b.num_targets;
      });
    // Each global batch of 6 is dealt 2/2/2; the last one (5 rows) 2/2/1.
    std::vector<torch::Tensor> joined;
    for (size_t i = 0; i < whole.size(); ++i)
      joined.push_back(torch::cat({shares[0][i], shares[1][i], shares[2][i]}));
    ASSERT_EQ(shares[2].size(), whole.size());
    for (size_t i = 0; i < whole.size(); ++i) EXPECT_TRUE(torch::equal(joined[i], whole[i])) << i;
    int64_t want = 0;
    qtune::for_each_eval_batch(data, 6, max_batches,
                               [&](const qtune::Batch& b) { want += b.num_targets; });
    EXPECT_EQ(targets, want);
  }
}

// ---------------------------------------------------------------------------------------------
// The local launcher

TEST(Launcher, GivesEachRankTorchrunsVariablesAndReturnsTheFirstFailure) {
  const std::string dir = qtune::test::temp_dir("launch");
  qtune::LaunchOptions o;
  o.nproc = 3;
  o.grace_s = 10;
  const std::string script =
      "echo \"$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR\" > " + dir +
      "/env$RANK; test \"$MASTER_PORT\" -gt 0 || exit 9; test \"$RANK\" = 1 && exit 3; exit 0";
  EXPECT_EQ(qtune::launch_local_ranks({"/bin/sh", "-c", script}, o), 3);
  for (int r = 0; r < 3; ++r)
    EXPECT_EQ(qtune::test::read_file(dir + "/env" + std::to_string(r)),
              std::to_string(r) + " 3 " + std::to_string(r) + " 3 127.0.0.1\n");
  o.nproc = 2;
  EXPECT_EQ(qtune::launch_local_ranks({"/bin/sh", "-c", "exit 0"}, o), 0);
  EXPECT_EQ(qtune::launch_local_ranks({"/bin/sh", "-c", "kill -KILL $$"}, o), 128 + SIGKILL);
}

TEST(Launcher, ForwardsSigtermToEveryRank) {
  const std::string dir = qtune::test::temp_dir("launch-sig");
  qtune::LaunchOptions o;
  o.nproc = 2;
  o.grace_s = 10;
  // Each rank says it is ready, then waits for SIGTERM and exits 0 with a note of it.
  const std::string script = "trap 'echo term > " + dir + "/term$RANK; exit 0' TERM; touch " +
                             dir + "/ready$RANK; i=0; while [ $i -lt 300 ]; do sleep 0.1; " +
                             "i=$((i+1)); done; exit 5";
  std::thread sender([&] {
    for (int i = 0; i < 300; ++i) {
      if (fs::exists(dir + "/ready0") && fs::exists(dir + "/ready1")) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    kill(getpid(), SIGTERM);
  });
  const int status = qtune::launch_local_ranks({"/bin/sh", "-c", script}, o);
  sender.join();
  EXPECT_EQ(status, 0);
  EXPECT_TRUE(fs::exists(dir + "/term0"));
  EXPECT_TRUE(fs::exists(dir + "/term1"));
}
