// Process groups on c10d (see process_group.h): the world from the launcher's environment, the
// join (TCPStore + Gloo/NCCL), collectives with lost-rank diagnosis and the start-up agreement
// check.
//
// Facts taken from PyTorch (torch/distributed/rendezvous.py, _create_c10d_store): without
// torchrun's agent store, rank 0 starts the TCPStore server on MASTER_PORT and the other ranks
// connect as clients; with TORCHELASTIC_USE_AGENT_STORE=True every rank is a client and keys
// live under "/worker/attempt_<TORCHELASTIC_RESTART_COUNT>". Gloo needs an explicit device
// (torch/distributed/distributed_c10d.py picks GLOO_SOCKET_IFNAME's interfaces, else the
// hostname's address, else loopback).
#include "qtune/process_group.h"

#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO  // the c10d headers hide Gloo without it; Debian's libtorch_cpu has it
#endif
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/version.h>
#ifdef QTUNE_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <set>
#include <sstream>
#include <thread>

#include "qtune/error.h"

extern char** environ;

namespace qtune {

// ---------------------------------------------------------------------------------------------
// LibTorch 1.13 / 2.x

// 2.0 split the collective implementations (ProcessGroupGloo, ProcessGroupNCCL) off
// ProcessGroup into c10d::Backend; both bases declare the same allreduce/barrier virtuals.
#if TORCH_VERSION_MAJOR >= 2
using CollectiveBackend = c10d::Backend;
#else
using CollectiveBackend = c10d::ProcessGroup;
#endif
// 1.13 moved ProcessGroup::Work to c10d::Work (2.x keeps it there).
#if TORCH_VERSION_MAJOR == 1 && TORCH_VERSION_MINOR < 13
using CollectiveWork = c10d::ProcessGroup::Work;
#else
using CollectiveWork = c10d::Work;
#endif

namespace {

using Clock = std::chrono::steady_clock;

// c10d messages carry a C++ backtrace and sometimes several lines; one line is what we show.
std::string first_line(const std::exception& e) {
  std::string s;
  if (auto* c = dynamic_cast<const c10::Error*>(&e))
    s = c->what_without_backtrace();
  else
    s = e.what();
  const auto nl = s.find('\n');
  if (nl != std::string::npos) s.resize(nl);
  return s;
}

bool contains(const std::string& s, const char* needle) { return s.find(needle) != std::string::npos; }

std::vector<uint8_t> bytes_of(const std::string& s) { return {s.begin(), s.end()}; }
std::string string_of(const std::vector<uint8_t>& b) { return {b.begin(), b.end()}; }

std::string host_name() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof buf - 1) != 0) return "?";
  return buf;
}

std::string seconds_text(double s) {
  std::ostringstream os;
  os << s << " s";
  return os.str();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Configuration and environment

DistConfig dist_config_from_recipe(const Json& recipe) {
  DistConfig c;
  QTUNE_CHECK(recipe.contains("dist") && recipe["dist"].is_object(),
              "dist: the recipe has no dist mapping");
  const Json& d = recipe["dist"];
  c.backend = d.at("backend").get<std::string>();
  QTUNE_CHECK(c.backend == "gloo" || c.backend == "nccl" || c.backend == "auto",
              "dist.backend must be gloo, nccl or auto, got \"", c.backend, "\"");
  c.timeout_s = d.at("timeout_s").get<double>();
  QTUNE_CHECK(std::isfinite(c.timeout_s) && c.timeout_s > 0 && c.timeout_s <= 86400,
              "dist.timeout_s must be in (0, 86400] seconds, got ", d["timeout_s"].dump());
  c.master_addr = d.at("master_addr").get<std::string>();
  c.master_port = d.at("master_port").get<int64_t>();
  QTUNE_CHECK(c.master_port >= 1 && c.master_port <= 65535,
              "dist.master_port must be in [1, 65535], got ", c.master_port);
  c.bucket_mb = d.at("bucket_mb").get<double>();
  QTUNE_CHECK(std::isfinite(c.bucket_mb) && c.bucket_mb > 0 && c.bucket_mb <= 4096,
              "dist.bucket_mb must be in (0, 4096] MiB, got ", d["bucket_mb"].dump());
  return c;
}

Environment current_environment() {
  Environment env;
  for (char** e = environ; e && *e; ++e) {
    const char* eq = std::strchr(*e, '=');
    if (eq) env.emplace(std::string(*e, static_cast<size_t>(eq - *e)), std::string(eq + 1));
  }
  return env;
}

namespace {

const std::string* lookup(const Environment& env, const std::string& name) {
  auto it = env.find(name);
  return it == env.end() ? nullptr : &it->second;
}

int64_t env_integer(const Environment& env, const std::string& name, int64_t min) {
  const std::string* v = lookup(env, name);
  QTUNE_CHECK(v, "dist: ", name, " is not set");
  int64_t out = 0;
  size_t used = 0;
  bool ok = !v->empty();
  try {
    out = std::stoll(*v, &used, 10);
  } catch (...) {
    ok = false;
  }
  QTUNE_CHECK(ok && used == v->size() && out >= min, "dist: ", name, " must be an integer >= ", min,
              ", got '", *v, "'");
  return out;
}

// SLURM_TASKS_PER_NODE reads like "2(x3),1": this node's count is not named, the first is used
// only when every node runs the same number (SLURM_NTASKS_PER_NODE is set by --ntasks-per-node).
int64_t slurm_local_world(const Environment& env) {
  if (lookup(env, "SLURM_NTASKS_PER_NODE")) return env_integer(env, "SLURM_NTASKS_PER_NODE", 1);
  if (const std::string* t = lookup(env, "SLURM_TASKS_PER_NODE")) {
    try {
      size_t used = 0;
      const int64_t n = std::stoll(*t, &used, 10);
      if (n >= 1) return n;
    } catch (...) {
    }
  }
  return 1;
}

void set_master(WorldInfo& w, const Environment& env, const DistConfig& c, const char* launcher) {
  if (const std::string* a = lookup(env, "MASTER_ADDR"); a && !a->empty()) {
    w.master_addr = *a;
    w.master_addr_from = "MASTER_ADDR";
  } else {
    w.master_addr = c.master_addr;
    w.master_addr_from = "dist.master_addr";
  }
  if (lookup(env, "MASTER_PORT")) {
    w.master_port = env_integer(env, "MASTER_PORT", 1);
    QTUNE_CHECK(w.master_port <= 65535, "dist: MASTER_PORT must be in [1, 65535], got ",
                w.master_port);
    w.master_port_from = "MASTER_PORT";
  } else {
    w.master_port = c.master_port;
    w.master_port_from = "dist.master_port";
  }
  QTUNE_CHECK(w.world_size == 1 || !w.master_addr.empty(), "dist: ", launcher, " started ",
              w.world_size,
              " ranks but no master address is known: set MASTER_ADDR or dist.master_addr to the "
              "host of rank 0",
              std::string(launcher) == "slurm"
                  ? " (e.g. the first name of `scontrol show hostnames $SLURM_JOB_NODELIST`)"
                  : "");
}

}  // namespace

WorldInfo world_from_environment(const Environment& env, const DistConfig& config) {
  WorldInfo w;
  if (lookup(env, "RANK") || lookup(env, "WORLD_SIZE")) {
    QTUNE_CHECK(lookup(env, "RANK") && lookup(env, "WORLD_SIZE"),
                "dist: RANK and WORLD_SIZE must be set together (", lookup(env, "RANK") ? "RANK" :
                "WORLD_SIZE", " is set, the other is not)");
    w.launcher = "torchrun";
    w.rank = env_integer(env, "RANK", 0);
    w.world_size = env_integer(env, "WORLD_SIZE", 1);
    w.local_rank = lookup(env, "LOCAL_RANK") ? env_integer(env, "LOCAL_RANK", 0) : w.rank;
    w.local_world_size =
        lookup(env, "LOCAL_WORLD_SIZE") ? env_integer(env, "LOCAL_WORLD_SIZE", 1) : w.world_size;
    const std::string* agent = lookup(env, "TORCHELASTIC_USE_AGENT_STORE");
    w.agent_store = agent && *agent == "True";
    if (w.agent_store) {
      const std::string* attempt = lookup(env, "TORCHELASTIC_RESTART_COUNT");
      w.store_prefix = "/worker/attempt_" + (attempt ? *attempt : std::string("0"));
    }
    QTUNE_CHECK(w.rank < w.world_size, "dist: RANK ", w.rank, " is not below WORLD_SIZE ",
                w.world_size);
    QTUNE_CHECK(w.local_rank < w.local_world_size, "dist: LOCAL_RANK ", w.local_rank,
                " is not below LOCAL_WORLD_SIZE ", w.local_world_size);
    set_master(w, env, config, "the launcher");
    return w;
  }
  if (lookup(env, "SLURM_NTASKS") && lookup(env, "SLURM_PROCID") &&
      env_integer(env, "SLURM_NTASKS", 1) > 1) {
    w.launcher = "slurm";
    w.rank = env_integer(env, "SLURM_PROCID", 0);
    w.world_size = env_integer(env, "SLURM_NTASKS", 1);
    w.local_rank = lookup(env, "SLURM_LOCALID") ? env_integer(env, "SLURM_LOCALID", 0) : 0;
    w.local_world_size = std::max(slurm_local_world(env), w.local_rank + 1);
    QTUNE_CHECK(w.rank < w.world_size, "dist: SLURM_PROCID ", w.rank,
                " is not below SLURM_NTASKS ", w.world_size);
    set_master(w, env, config, "slurm");
    return w;
  }
  return w;
}

// ---------------------------------------------------------------------------------------------
// The c10d side

class ProcessGroupImpl {
 public:
  std::chrono::milliseconds timeout{600000};
  c10::intrusive_ptr<c10d::TCPStore> tcp;  // rank 0 without an agent store: also the server
  c10::intrusive_ptr<c10d::Store> store;   // our keys: "<agent prefix>/qtune/..."
  c10::intrusive_ptr<CollectiveBackend> backend;
  std::thread heartbeat;
  std::atomic<bool> stop_heartbeat{false};
  bool finished = false;

  ~ProcessGroupImpl() { end_heartbeat(); }
  void end_heartbeat() {
    stop_heartbeat.store(true);
    if (heartbeat.joinable()) heartbeat.join();
  }
};

namespace {

constexpr auto kHeartbeatPeriod = std::chrono::milliseconds(200);
constexpr auto kLostAfter = std::chrono::milliseconds(2000);

c10::intrusive_ptr<c10d::Store> prefixed(const WorldInfo& w,
                                         const c10::intrusive_ptr<c10d::TCPStore>& tcp) {
  c10::intrusive_ptr<c10d::Store> base = tcp;
  if (!w.store_prefix.empty()) base = c10::make_intrusive<c10d::PrefixStore>(w.store_prefix, base);
  return c10::make_intrusive<c10d::PrefixStore>("qtune", base);
}

c10::intrusive_ptr<c10d::TCPStore> connect_store(const WorldInfo& w, bool server,
                                                 std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions o;
  o.port = static_cast<std::uint16_t>(w.master_port);
  o.isServer = server;
  o.waitWorkers = false;  // the join below waits, with messages that name the missing ranks
  o.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>(w.master_addr, o);
}

// Waits until `keys` exist, giving up at `deadline` or when some rank has published "abort".
// Returns the keys still missing (empty = all there).
std::vector<std::string> wait_for(c10d::Store& store, const std::vector<std::string>& keys,
                                  Clock::time_point deadline) {
  std::vector<std::string> missing = keys;
  for (;;) {
    std::vector<std::string> still;
    for (const auto& k : missing)
      if (!store.check({k})) still.push_back(k);
    missing.swap(still);
    if (missing.empty()) return missing;
    if (store.check({"abort"})) throw UserError(string_of(store.get("abort")));
    if (Clock::now() >= deadline) return missing;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

// Publishes `message` as the reason every rank stops, then throws it.
[[noreturn]] void abort_job(c10d::Store& store, const std::string& message) {
  try {
    store.set("abort", bytes_of(message));
  } catch (...) {
  }
  throw UserError(message);
}

void flatten(const Json& j, const std::string& prefix, std::map<std::string, Json>& out) {
  if (j.is_object() && !j.empty()) {
    for (const auto& [k, v] : j.items()) flatten(v, prefix.empty() ? k : prefix + "." + k, out);
  } else {
    out[prefix] = j;
  }
}

}  // namespace

std::shared_ptr<ProcessGroup> ProcessGroup::single() {
  return std::shared_ptr<ProcessGroup>(new ProcessGroup());
}

std::shared_ptr<ProcessGroup> ProcessGroup::join(const WorldInfo& world, const DistConfig& config,
                                                 const std::string& device) {
  std::shared_ptr<ProcessGroup> g(new ProcessGroup());
  g->world_ = world;
  if (world.world_size == 1) return g;
  // A write to a peer that just died raises SIGPIPE, whose default action ends this process
  // before the failed collective can name the lost rank. (Python, torchrun's usual host,
  // ignores SIGPIPE at start-up; c10d and Gloo rely on getting EPIPE instead.)
  std::signal(SIGPIPE, SIG_IGN);

  const bool cuda = device.rfind("cuda", 0) == 0;
  std::string backend = config.backend;
  if (backend == "auto") backend = cuda ? "nccl" : "gloo";
#ifndef QTUNE_WITH_NCCL
  if (backend == "nccl" && config.backend == "auto") backend = "gloo";
  QTUNE_CHECK(backend != "nccl",
              "dist.backend is nccl, but this build's LibTorch has no CUDA/NCCL; use gloo");
#endif
  QTUNE_CHECK(backend != "nccl" || cuda, "dist.backend nccl needs a cuda device, got device \"",
              device, "\"");
  g->backend_ = backend;

  auto impl = std::make_unique<ProcessGroupImpl>();
  impl->timeout = std::chrono::milliseconds(static_cast<int64_t>(config.timeout_s * 1000));
  const int64_t r = world.rank, n = world.world_size;
  const std::string master = world.master_addr + ":" + std::to_string(world.master_port);
  const std::string where =
      " (" + world.master_addr_from + "=" + world.master_addr + ", " + world.master_port_from +
      "=" + std::to_string(world.master_port) + ")";
  const bool server = r == 0 && !world.agent_store;
  try {
    impl->tcp = connect_store(world, server, impl->timeout);
  } catch (const std::exception& e) {
    const std::string m = first_line(e);
    if (server && (contains(m, "already in use") || contains(m, "EADDRINUSE")))
      throw UserError("dist: rank 0 cannot listen on port " + std::to_string(world.master_port) +
                      where + ": the address is already in use; choose a free port");
    if (server)
      throw UserError("dist: rank 0 cannot host the store on " + master + where + ": " + m);
    throw UserError("dist: rank " + std::to_string(r) + " cannot reach the master " + master +
                    where + " within " + seconds_text(config.timeout_s) + ": " + m);
  }
  impl->store = prefixed(world, impl->tcp);
  impl->store->setTimeout(impl->timeout);
  c10d::Store& store = *impl->store;
  const auto deadline = Clock::now() + impl->timeout;

  try {
    if (store.add("claim/" + std::to_string(r), 1) > 1)
      abort_job(store, "dist: rank " + std::to_string(r) +
                           " is claimed by two processes; every process needs its own RANK");
    if (r == 0) store.set("world", bytes_of(std::to_string(n)));
    if (wait_for(store, {"world"}, deadline).empty()) {
      const std::string theirs = string_of(store.get("world"));
      if (theirs != std::to_string(n))
        abort_job(store, "dist: mismatched world sizes: rank 0 has WORLD_SIZE " + theirs +
                             ", rank " + std::to_string(r) + " has " + std::to_string(n));
    } else {
      throw UserError("dist: rank " + std::to_string(r) + " reached the store at " + master +
                      " but rank 0 did not join within " + seconds_text(config.timeout_s));
    }
    store.set("joined/" + std::to_string(r),
              bytes_of(Json{{"host", host_name()}, {"pid", static_cast<int64_t>(getpid())}}.dump()));
    std::vector<std::string> keys;
    for (int64_t i = 0; i < n; ++i) keys.push_back("joined/" + std::to_string(i));
    const auto missing = wait_for(store, keys, deadline);
    if (!missing.empty()) {
      std::string names;
      for (const auto& k : missing) names += (names.empty() ? "" : ", ") + k.substr(7);
      abort_job(store, "dist: rank(s) " + names + " of WORLD_SIZE " + std::to_string(n) +
                           " did not join within " + seconds_text(config.timeout_s) +
                           " (is every rank started, with the same master " + master + "?)");
    }
  } catch (const UserError&) {
    throw;
  } catch (const std::exception& e) {
    throw UserError("dist: rank " + std::to_string(r) + " lost the store at " + master +
                    " while joining: " + first_line(e));
  }

  // The collective backend connects every pair through the store (its keys under "backend/").
  auto backend_store = c10::make_intrusive<c10d::PrefixStore>("backend", impl->store);
  try {
    if (backend == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create(impl->timeout);
      if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname) {
        std::stringstream names(ifname);
        for (std::string name; std::getline(names, name, ',');)
          if (!name.empty())
            opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
      } else if (world.local_world_size == world.world_size) {
        // Every rank on this machine: loopback works whatever the hostname resolves to.
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      impl->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(
          backend_store, static_cast<int>(r), static_cast<int>(n), opts);
    }
#ifdef QTUNE_WITH_NCCL
    if (backend == "nccl") {
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = impl->timeout;
      impl->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          backend_store, static_cast<int>(r), static_cast<int>(n), opts);
    }
#endif
  } catch (const std::exception& e) {
    throw UserError("dist: rank " + std::to_string(r) + " could not connect the " + backend +
                    " backend to the other ranks: " + first_line(e) +
                    " (set GLOO_SOCKET_IFNAME to the interface the machines share)");
  }

  // Each rank counts up its own key from a thread with its own connection, so a rank whose count
  // stops is one that is gone (a rank busy in a long collective still counts).
  c10::intrusive_ptr<c10d::Store> hb_store;
  try {
    hb_store = prefixed(world, connect_store(world, false, impl->timeout));
  } catch (const std::exception& e) {
    throw UserError("dist: rank " + std::to_string(r) + " cannot open a second connection to " +
                    master + ": " + first_line(e));
  }
  ProcessGroupImpl* raw = impl.get();
  impl->heartbeat = std::thread([raw, hb_store, key = "beat/" + std::to_string(r)] {
    while (!raw->stop_heartbeat.load()) {
      try {
        hb_store->add(key, 1);
      } catch (...) {
        return;  // the store is gone: the main thread finds out at its next collective
      }
      std::this_thread::sleep_for(kHeartbeatPeriod);
    }
  });
  g->impl_ = std::move(impl);
  spdlog::info("dist: rank {} of {} joined ({}, master {}, local rank {} of {})", r, n, backend,
               master, world.local_rank, world.local_world_size);
  return g;
}

ProcessGroup::~ProcessGroup() {
  if (impl_ && !impl_->finished) {
    // Leaving without finish(): an error is unwinding; the others notice this rank is gone.
    impl_->end_heartbeat();
    // The store dies with its host: give the others time to read it for their diagnosis.
    if (impl_->tcp && is_main() && !world_.agent_store)
      std::this_thread::sleep_for(kLostAfter + std::chrono::milliseconds(1500));
  }
}

void ProcessGroup::finish() {
  if (!impl_ || impl_->finished) return;
  barrier("the end of the run");
  impl_->end_heartbeat();
  // Rank 0 hosts the store: everyone must be done with it before it goes.
  try {
    impl_->store->set("done/" + std::to_string(rank()), bytes_of("1"));
    std::vector<std::string> keys;
    for (int64_t i = 0; i < world_size(); ++i) keys.push_back("done/" + std::to_string(i));
    if (is_main()) wait_for(*impl_->store, keys, Clock::now() + impl_->timeout);
  } catch (const std::exception& e) {
    spdlog::warn("dist: leaving the group: {}", first_line(e));
  }
  impl_->finished = true;
}

void ProcessGroup::announce_failure(const std::string& message) noexcept {
  if (!impl_ || impl_->finished) return;
  try {
    impl_->store->set("failed/" + std::to_string(rank()), bytes_of(message));
  } catch (...) {
  }
}

// ---------------------------------------------------------------------------------------------
// Collectives

void ProcessGroup::fail(const std::string& what, const std::exception& e) {
  const std::string cause = first_line(e);
  const int64_t n = world_size();
  std::string lost, said;
  try {
    c10d::Store& store = *impl_->store;
    auto beats = [&] {
      std::vector<int64_t> b(n);
      for (int64_t i = 0; i < n; ++i) b[i] = store.add("beat/" + std::to_string(i), 0);
      return b;
    };
    const auto before = beats();
    std::this_thread::sleep_for(kLostAfter);
    const auto after = beats();
    for (int64_t i = 0; i < n; ++i) {
      const std::string failed = "failed/" + std::to_string(i);
      const std::string message = i != rank() && store.check({failed})
                                      ? string_of(store.get(failed)) : std::string();
      if (i == rank() || after[i] != before[i]) {
        if (!message.empty() && said.empty())
          said = "rank " + std::to_string(i) + " failed: " + message;
        continue;
      }
      std::string who;
      try {
        const Json j = Json::parse(string_of(store.get("joined/" + std::to_string(i))));
        who = " (" + j["host"].get<std::string>() + " pid " +
              std::to_string(j["pid"].get<int64_t>()) + ")";
      } catch (...) {
      }
      lost += (lost.empty() ? "" : ", ") + std::to_string(i) + who;
      if (!message.empty()) said += (said.empty() ? "" : "; ") + ("rank " + std::to_string(i) +
                                                                 " said: " + message);
    }
  } catch (const std::exception&) {
    // The store itself is unreachable: its host, rank 0 (or torchrun's agent), is gone.
    lost = world_.agent_store ? "0 (or the torchrun agent that hosts the store)"
                              : "0 (which hosts the store at " + world_.master_addr + ":" +
                                    std::to_string(world_.master_port) + ")";
  }
  if (!lost.empty())
    throw UserError("dist: lost rank " + lost + " during " + what + ": " +
                    (said.empty() ? cause : said));
  if (!said.empty()) throw UserError("dist: " + what + " stopped because " + said);
  throw UserError("dist: " + what + " failed on rank " + std::to_string(rank()) +
                  " while every rank is still alive (a rank is stuck? dist.timeout_s is " +
                  seconds_text(impl_->timeout.count() / 1000.0) + "): " + cause);
}

void ProcessGroup::all_reduce_sum(torch::Tensor& t, const std::string& what) {
  if (world_size() == 1) return;
  TORCH_CHECK(t.is_contiguous(), "all_reduce_sum needs a contiguous tensor");
  const auto t0 = Clock::now();
  std::vector<at::Tensor> tensors{t};
  try {
    c10::intrusive_ptr<CollectiveWork> work = impl_->backend->allreduce(tensors);
    work->wait(impl_->timeout + std::chrono::seconds(10));
  } catch (const std::exception& e) {
    fail(what, e);
  }
  reduce_seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
  reduce_bytes_ += static_cast<int64_t>(t.numel() * t.element_size());
}

struct PendingCollective::Work {
  c10::intrusive_ptr<CollectiveWork> work;
  std::vector<at::Tensor> keep;  // the tensors it reads and writes
};

PendingCollective::PendingCollective(ProcessGroup* group, std::string what, int64_t bytes,
                                     bool gather, std::unique_ptr<Work> work)
    : group_(group), what_(std::move(what)), bytes_(bytes), gather_(gather),
      work_(std::move(work)) {}

PendingCollective::~PendingCollective() {
  if (waited_ || !work_) return;
  try {
    work_->work->wait(group_->impl_->timeout + std::chrono::seconds(10));
  } catch (...) {
  }
}

void PendingCollective::wait() {
  if (waited_) return;
  waited_ = true;
  const auto t0 = Clock::now();
  if (work_) {
    try {
      work_->work->wait(group_->impl_->timeout + std::chrono::seconds(10));
    } catch (const std::exception& e) {
      group_->fail(what_, e);
    }
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  (gather_ ? group_->gather_seconds_ : group_->reduce_seconds_) += s;
  (gather_ ? group_->gather_bytes_ : group_->reduce_bytes_) += bytes_;
}

std::unique_ptr<PendingCollective> ProcessGroup::all_reduce_sum_async(const torch::Tensor& t,
                                                                      const std::string& what) {
  TORCH_CHECK(t.is_contiguous(), "all_reduce_sum_async needs a contiguous tensor");
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  std::unique_ptr<PendingCollective::Work> work;
  if (world_size() > 1) {
    work = std::make_unique<PendingCollective::Work>();
    work->keep = {t};
    try {
      work->work = impl_->backend->allreduce(work->keep);
    } catch (const std::exception& e) {
      fail(what, e);
    }
  }
  return std::unique_ptr<PendingCollective>(
      new PendingCollective(this, what, bytes, /*gather=*/false, std::move(work)));
}

std::unique_ptr<PendingCollective> ProcessGroup::all_gather_async(const torch::Tensor& mine,
                                                                  const torch::Tensor& all,
                                                                  const std::string& what) {
  const int64_t n = mine.numel(), w = world_size();
  TORCH_CHECK(mine.dim() == 1 && all.dim() == 1 && mine.is_contiguous() && all.is_contiguous() &&
                  all.numel() == n * w && all.scalar_type() == mine.scalar_type(),
              "all_gather_async: needs 1-D contiguous tensors of n and world_size * n elements");
  const int64_t bytes = all.numel() * static_cast<int64_t>(all.element_size());
  std::unique_ptr<PendingCollective::Work> work;
  if (w == 1) {
    all.copy_(mine);
  } else {
    work = std::make_unique<PendingCollective::Work>();
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int64_t r = 0; r < w; ++r) outputs[0].push_back(all.narrow(0, r * n, n));
    work->keep = {mine, all};
    std::vector<at::Tensor> inputs{mine};
    try {
      work->work = impl_->backend->allgather(outputs, inputs);
    } catch (const std::exception& e) {
      fail(what, e);
    }
  }
  return std::unique_ptr<PendingCollective>(
      new PendingCollective(this, what, bytes, /*gather=*/true, std::move(work)));
}

bool ProcessGroup::any(bool flag, const std::string& what) {
  if (world_size() == 1) return flag;
  auto t = torch::tensor({int64_t{flag ? 1 : 0}}, torch::kInt64);
  all_reduce_sum(t, what);
  return t.item<int64_t>() > 0;
}

void ProcessGroup::barrier(const std::string& what) {
  if (world_size() == 1) return;
  try {
    c10::intrusive_ptr<CollectiveWork> work = impl_->backend->barrier();
    work->wait(impl_->timeout + std::chrono::seconds(10));
  } catch (const std::exception& e) {
    fail(what, e);
  }
}

void ProcessGroup::check_agreement(const std::string& what, const Json& mine) {
  if (world_size() == 1) return;
  c10d::Store& store = *impl_->store;
  const std::string base = "agree/" + what + "/";
  const int64_t n = world_size();
  const auto deadline = Clock::now() + impl_->timeout;
  std::string verdict;
  try {
    store.set(base + std::to_string(rank()), bytes_of(mine.dump()));
    if (is_main()) {
      std::vector<std::string> keys;
      for (int64_t i = 1; i < n; ++i) keys.push_back(base + std::to_string(i));
      const auto missing = wait_for(store, keys, deadline);
      if (!missing.empty()) {
        verdict = "dist: rank " + missing.front().substr(base.size()) + " did not report its " +
                  what + " within " + seconds_text(impl_->timeout.count() / 1000.0);
      } else {
        std::map<std::string, Json> ours;
        flatten(mine, "", ours);
        for (int64_t i = 1; i < n && verdict.empty(); ++i) {
          std::map<std::string, Json> theirs;
          flatten(Json::parse(string_of(store.get(base + std::to_string(i)))), "", theirs);
          std::set<std::string> keys_all;
          for (const auto& [k, _] : ours) keys_all.insert(k);
          for (const auto& [k, _] : theirs) keys_all.insert(k);
          std::vector<std::string> diffs;
          for (const auto& k : keys_all) {
            auto a = ours.find(k), b = theirs.find(k);
            const Json va = a == ours.end() ? Json("(unset)") : a->second;
            const Json vb = b == theirs.end() ? Json("(unset)") : b->second;
            if (va != vb)
              diffs.push_back(k + " = " + vb.dump() + " on rank " + std::to_string(i) + ", " +
                              va.dump() + " on rank 0");
          }
          if (diffs.empty()) continue;
          verdict = "dist: rank " + std::to_string(i) + " disagrees with rank 0 on the " + what +
                    ": " + diffs[0];
          for (size_t k = 1; k < std::min<size_t>(diffs.size(), 3); ++k) verdict += "; " + diffs[k];
          if (diffs.size() > 3) verdict += " (and " + std::to_string(diffs.size() - 3) + " more)";
          verdict += "; every rank must run the same recipe and files";
        }
      }
      store.set(base + "verdict", bytes_of(verdict.empty() ? "ok" : verdict));
    } else {
      if (!wait_for(store, {base + "verdict"}, deadline).empty())
        throw UserError("dist: rank 0 did not compare the " + what + " within " +
                        seconds_text(impl_->timeout.count() / 1000.0));
      verdict = string_of(store.get(base + "verdict"));
      if (verdict == "ok") verdict.clear();
    }
  } catch (const UserError&) {
    throw;
  } catch (const std::exception& e) {
    fail("the " + what + " check", e);
  }
  if (!verdict.empty()) throw UserError(verdict);
}

std::string tensor_fingerprint(const std::vector<torch::Tensor>& tensors) {
  uint64_t h = 1469598103934665603ULL;  // FNV-1a 64 offset basis
  for (const auto& t : tensors) {
    const auto c = t.detach().to(torch::kCPU).contiguous();
    const auto* p = static_cast<const unsigned char*>(c.data_ptr());
    const size_t nbytes = static_cast<size_t>(c.numel()) * c.element_size();
    for (size_t i = 0; i < nbytes; ++i) {
      h ^= p[i];
      h *= 1099511628211ULL;
    }
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace qtune
