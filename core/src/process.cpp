// Process-wide allocator settings, applied when libqtune_core loads; memory readings and child
// processes (see qtune/process.h).
//
// Training allocates and frees the same large activation buffers every step. glibc serves
// blocks above its mmap threshold (at most 32 MB) with fresh mmap()s and returns them on free,
// so every step page-faults its activations in again: on the virtual machines we run on that
// made a stories260K step 20x slower than the arithmetic. Keeping freed memory in the heap lets
// the next step reuse it. Set QTUNE_SYSTEM_MALLOC=1 to keep glibc's defaults.
#include "qtune/process.h"

#include <fcntl.h>
#include <malloc.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "qtune/error.h"

extern char** environ;

namespace qtune {
namespace {

struct AllocatorSetup {
  AllocatorSetup() {
    const char* keep = std::getenv("QTUNE_SYSTEM_MALLOC");
    if (keep && *keep && *keep != '0') return;
    mallopt(M_MMAP_MAX, 0);                  // large blocks come from the heap too
    mallopt(M_TRIM_THRESHOLD, 1 << 30);      // and stay there (up to 1 GiB of free top)
    mallopt(M_TOP_PAD, 64 << 20);            // grow the heap in 64 MB steps
  }
};
const AllocatorSetup kAllocatorSetup;

}  // namespace

void return_freed_heap() {
  // 256 MB of slack: enough that the next matrix usually reuses it without page faults, small
  // beside the models that need it.
  if (mallinfo2().fordblks > (size_t{256} << 20)) malloc_trim(0);
}

int64_t peak_rss_bytes() {
  // VmHWM belongs to this process image. getrusage's ru_maxrss survives exec on Linux, so a
  // trainer started by a large process (a benchmark driver, a notebook) would report its
  // parent's peak; it is only the fallback where /proc is missing.
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::atoll(line.c_str() + 6) * 1024;  // kB
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

int64_t current_rss_bytes() {
  std::ifstream in("/proc/self/statm");
  int64_t size = 0, resident = 0;
  in >> size >> resident;
  return resident * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
}

bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.flush();
  return out.good();
}

int run_child(const std::string& exe, const std::vector<std::string>& args,
              const std::string& log_path) {
  std::vector<std::string> all{exe};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, log_path.c_str(),
                                   O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, exe.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  QTUNE_CHECK(rc == 0, "cannot run ", exe, ": ", std::strerror(rc));
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return 127;
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

}  // namespace qtune
