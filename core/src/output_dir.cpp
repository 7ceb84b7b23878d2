// Output directory lock and the refusals of prepare_output_directory (see output_dir.h).
#include "qtune/output_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>

#include "qtune/error.h"

namespace fs = std::filesystem;

namespace qtune {

namespace {

std::string holder_line() {
  char host[256] = {0};
  if (gethostname(host, sizeof host - 1) != 0) std::strcpy(host, "?");
  const std::time_t now = std::time(nullptr);
  char when[32] = {0};
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return detail::concat(program_invocation_short_name, " pid ", getpid(), " on ", host, " since ",
                        when);
}

// Whether `inner` is `outer` or lies below it (both canonical).
bool within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i)
    if (i == inner.end() || *i != *o) return false;
  return true;
}

}  // namespace

const char* directory_lock_name() { return ".qtune.lock"; }

DirectoryLock::DirectoryLock(const std::string& dir, const std::string& what) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  QTUNE_CHECK(!ec, what, ": cannot create ", dir, ": ", ec.message());
  const std::string path = (fs::path(dir) / directory_lock_name()).string();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  QTUNE_CHECK(fd_ >= 0, what, ": cannot open ", path, ": ", std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[512] = {0};
    const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
    std::string holder = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "another process";
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == '\r')) holder.pop_back();
    ::close(fd_);
    fd_ = -1;
    QTUNE_CHECK(err == EWOULDBLOCK, what, ": cannot lock ", path, ": ", std::strerror(err));
    throw UserError(detail::concat(what, ": ", dir, " is in use by another run (", holder,
                                   "); wait for it to end or choose another ", what));
  }
  // Ours now (a lock left by a killed process is free again): record who holds it.
  const std::string line = holder_line() + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, line.data(), line.size(), 0) < 0)
    throw UserError(detail::concat(what, ": cannot write ", path, ": ", std::strerror(errno)));
}

DirectoryLock::~DirectoryLock() {
  if (fd_ >= 0) ::close(fd_);  // closing the descriptor releases the flock
}

void prepare_output_directory(const std::string& dir, const std::string& flag, bool overwrite,
                              const std::vector<std::string>& inputs) {
  QTUNE_CHECK(!dir.empty(), flag, " is empty");
  std::error_code ec;
  const fs::path out = fs::weakly_canonical(dir, ec);
  QTUNE_CHECK(!ec, flag, ": cannot resolve ", dir, ": ", ec.message());
  for (const auto& input : inputs) {
    if (input.empty() || !fs::exists(input)) continue;
    fs::path p = fs::weakly_canonical(input, ec);
    if (ec) continue;
    if (!fs::is_directory(p)) p = p.parent_path();
    QTUNE_CHECK(!within(p, out), flag, " ", dir, " would write over ", input,
                (out == p ? ", one of this command's inputs" : ", which lies inside it"),
                "; choose another directory (--overwrite never applies to an input)");
  }
  if (fs::exists(out)) {
    QTUNE_CHECK(fs::is_directory(out), flag, " ", dir, " exists and is not a directory");
    if (!fs::is_empty(out)) {
      QTUNE_CHECK(overwrite, flag, " ", dir,
                  " is not empty; choose an empty or new directory, or pass --overwrite to "
                  "replace its contents");
      for (const auto& entry : fs::directory_iterator(out)) {
        fs::remove_all(entry.path(), ec);
        QTUNE_CHECK(!ec, flag, ": cannot remove ", entry.path().string(), ": ", ec.message());
      }
    }
  }
  fs::create_directories(out, ec);
  QTUNE_CHECK(!ec, flag, ": cannot create ", dir, ": ", ec.message());
}

}  // namespace qtune
