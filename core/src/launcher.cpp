// Local data-parallel launch (see launcher.h): fork + exec of each rank with torchrun's
// variables, signal forwarding, and the first failure's status.
#include "qtune/launcher.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "qtune/error.h"

extern char** environ;

namespace qtune {

namespace {

// The ranks the signal handler forwards to (a handler can only read plain globals).
constexpr int kMaxRanks = 1024;
pid_t g_ranks[kMaxRanks];
std::atomic<int> g_num_ranks{0};

void forward_signal(int sig) {
  const int n = g_num_ranks.load();
  for (int i = 0; i < n; ++i)
    if (g_ranks[i] > 0) kill(g_ranks[i], sig);
}

bool is_torchrun_variable(const char* entry) {
  static const char* kNames[] = {"RANK=",        "WORLD_SIZE=",  "LOCAL_RANK=",
                                 "LOCAL_WORLD_SIZE=", "MASTER_ADDR=", "MASTER_PORT=",
                                 "GROUP_RANK=", "TORCHELASTIC_USE_AGENT_STORE="};
  for (const char* n : kNames)
    if (std::strncmp(entry, n, std::strlen(n)) == 0) return true;
  return false;
}

}  // namespace

int free_local_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  QTUNE_CHECK(fd >= 0, "launcher: cannot open a socket: ", std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  const int err = errno;
  close(fd);
  QTUNE_CHECK(ok, "launcher: cannot find a free port on 127.0.0.1: ", std::strerror(err));
  return ntohs(addr.sin_port);
}

int launch_local_ranks(const std::vector<std::string>& args, const LaunchOptions& options) {
  QTUNE_CHECK(!args.empty(), "launcher: no program to start");
  QTUNE_CHECK(options.nproc >= 1 && options.nproc <= kMaxRanks,
              "--nproc_per_node must be in [1, ", kMaxRanks, "], got ", options.nproc);
  QTUNE_CHECK(std::getenv("RANK") == nullptr,
              "--nproc_per_node cannot be used under a launcher that already set RANK (torchrun, "
              "or a rank started by --nproc_per_node); drop one of them");
  const int n = static_cast<int>(options.nproc);
  const std::string port = std::to_string(free_local_port());

  // Everything exec needs is built before fork: the child only calls async-signal-safe functions.
  std::vector<std::vector<std::string>> envs(n);
  for (int r = 0; r < n; ++r) {
    for (char** e = environ; e && *e; ++e)
      if (!is_torchrun_variable(*e)) envs[r].emplace_back(*e);
    envs[r].push_back("RANK=" + std::to_string(r));
    envs[r].push_back("LOCAL_RANK=" + std::to_string(r));
    envs[r].push_back("GROUP_RANK=0");
    envs[r].push_back("WORLD_SIZE=" + std::to_string(n));
    envs[r].push_back("LOCAL_WORLD_SIZE=" + std::to_string(n));
    envs[r].push_back("MASTER_ADDR=127.0.0.1");
    envs[r].push_back("MASTER_PORT=" + port);
    for (const auto& e : options.env) envs[r].push_back(e);
  }
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);

  struct sigaction forward {}, old_int {}, old_term {};
  forward.sa_handler = forward_signal;
  sigemptyset(&forward.sa_mask);
  forward.sa_flags = SA_RESTART;
  g_num_ranks.store(0);
  sigaction(SIGINT, &forward, &old_int);
  sigaction(SIGTERM, &forward, &old_term);
  auto restore_signals = [&] {
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
    g_num_ranks.store(0);
  };

  spdlog::info("launcher: starting {} ranks on 127.0.0.1:{}", n, port);
  for (int r = 0; r < n; ++r) {
    std::vector<char*> envp;
    for (auto& e : envs[r]) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::fflush(nullptr);
    const pid_t pid = fork();
    if (pid < 0) {
      const int err = errno;
      forward_signal(SIGTERM);
      restore_signals();
      throw UserError(std::string("launcher: cannot start rank ") + std::to_string(r) + ": " +
                      std::strerror(err));
    }
    if (pid == 0) {
      // The parent's handlers would forward to our siblings: ranks handle signals themselves.
      signal(SIGINT, SIG_DFL);
      signal(SIGTERM, SIG_DFL);
      execvpe(argv[0], argv.data(), envp.data());
      const char msg[] = "launcher: exec failed\n";
      (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
      _exit(127);
    }
    g_ranks[r] = pid;
    g_num_ranks.store(r + 1);
  }

  using clock = std::chrono::steady_clock;
  std::vector<bool> running(n, true);
  int alive = n, first_failed = -1, first_status = 0;
  clock::time_point kill_at{};
  while (alive > 0) {
    bool reaped = false;
    for (int r = 0; r < n; ++r) {
      if (!running[r]) continue;
      int status = 0;
      const pid_t p = waitpid(g_ranks[r], &status, WNOHANG);
      if (p != g_ranks[r]) continue;
      reaped = true;
      running[r] = false;
      g_ranks[r] = -1;
      --alive;
      const int code = WIFEXITED(status) ? WEXITSTATUS(status)
                                         : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
      if (code != 0) {
        if (WIFSIGNALED(status))
          spdlog::error("launcher: rank {} was killed by signal {}", r, WTERMSIG(status));
        else
          spdlog::error("launcher: rank {} exited with status {}", r, code);
        if (first_failed < 0) {
          first_failed = r;
          first_status = code;
          kill_at = clock::now() + std::chrono::milliseconds(
                                       static_cast<int64_t>(options.grace_s * 1000));
        }
      }
    }
    if (alive > 0 && first_failed >= 0 && clock::now() >= kill_at) {
      spdlog::error("launcher: {} rank(s) still running {:.0f} s after rank {} failed; killing them",
                    alive, options.grace_s, first_failed);
      for (int r = 0; r < n; ++r)
        if (running[r]) kill(g_ranks[r], SIGKILL);
      kill_at = clock::time_point::max();
    }
    if (!reaped && alive > 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  restore_signals();
  return first_status;
}

}  // namespace qtune
