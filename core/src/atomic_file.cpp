// Atomic file replacement (see atomic_file.h): temp file + fsync + rename + directory fsync.
#include "qtune/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <streambuf>
#include <vector>

#include "qtune/error.h"
#include "text_util.h"

namespace fs = std::filesystem;

namespace qtune {
namespace {

using detail::errno_text;

// A minimal output streambuf over a POSIX fd. std::ofstream cannot give us its descriptor, and
// we need it for fsync; write errors are remembered (not thrown through the iostream layer,
// which would swallow them) and reported by the caller.
class FdStreamBuf : public std::streambuf {
 public:
  explicit FdStreamBuf(int fd) : fd_(fd), buf_(1 << 20) {
    setp(buf_.data(), buf_.data() + buf_.size());
  }
  bool failed() const { return failed_; }
  int saved_errno() const { return errno_; }
  bool flush_all() { return flush_buffer(); }

 protected:
  int_type overflow(int_type ch) override {
    if (!flush_buffer()) return traits_type::eof();
    if (!traits_type::eq_int_type(ch, traits_type::eof())) {
      *pptr() = traits_type::to_char_type(ch);
      pbump(1);
    }
    return traits_type::not_eof(ch);
  }
  int sync() override { return flush_buffer() ? 0 : -1; }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    // Large blocks (tensor payloads) bypass the buffer.
    if (n >= static_cast<std::streamsize>(buf_.size())) {
      if (!flush_buffer() || !write_all(s, static_cast<size_t>(n))) return 0;
      return n;
    }
    return std::streambuf::xsputn(s, n);
  }

 private:
  bool write_all(const char* p, size_t n) {
    if (failed_) return false;
    while (n > 0) {
      ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        failed_ = true;
        errno_ = errno;
        return false;
      }
      p += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  }
  bool flush_buffer() {
    size_t n = static_cast<size_t>(pptr() - pbase());
    bool ok = write_all(pbase(), n);
    setp(buf_.data(), buf_.data() + buf_.size());
    return ok;
  }

  int fd_;
  std::vector<char> buf_;
  bool failed_ = false;
  int errno_ = 0;
};

// Removes the temporary file unless released (the rename succeeded).
struct TempGuard {
  std::string path;
  int fd = -1;
  bool armed = true;
  ~TempGuard() {
    if (fd >= 0) ::close(fd);
    if (armed && !path.empty()) ::unlink(path.c_str());
  }
};

}  // namespace

void fsync_directory(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  QTUNE_CHECK(fd >= 0, "cannot open directory ", dir, " to fsync it: ", errno_text());
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  // Some filesystems (e.g. certain network mounts) refuse fsync on directories; that is not a
  // failure of the write itself.
  QTUNE_CHECK(rc == 0 || err == EINVAL || err == EROFS, "fsync of directory ", dir,
              " failed: ", std::strerror(err));
}

void atomic_write(const std::string& path, const std::function<void(std::ostream&)>& writer) {
  QTUNE_CHECK(!path.empty(), "atomic_write: empty output path");
  fs::path target(path);
  fs::path dir = target.parent_path();
  if (dir.empty()) dir = ".";
  std::error_code ec;
  QTUNE_CHECK(fs::is_directory(dir, ec), "cannot write ", path, ": directory ", dir.string(),
              " does not exist");
  QTUNE_CHECK(!fs::is_directory(target, ec), "cannot write ", path, ": it is a directory");

  std::string pattern = (dir / ("." + target.filename().string() + ".tmp-XXXXXX")).string();
  std::vector<char> name(pattern.begin(), pattern.end());
  name.push_back('\0');
  TempGuard tmp;
  tmp.fd = ::mkostemp(name.data(), O_CLOEXEC);
  QTUNE_CHECK(tmp.fd >= 0, "cannot create a temporary file beside ", path, ": ", errno_text());
  tmp.path = name.data();

  // mkstemp makes the file 0600; keep the replaced file's mode, else the usual 0644.
  struct stat st;
  mode_t mode = (::stat(path.c_str(), &st) == 0) ? (st.st_mode & 07777) : 0644;
  ::fchmod(tmp.fd, mode);

  FdStreamBuf buf(tmp.fd);
  {
    std::ostream os(&buf);
    writer(os);  // an exception here leaves through TempGuard: temp removed, target untouched
    os.flush();
    QTUNE_CHECK(!buf.failed() && buf.flush_all() && os.good(), "writing ", path,
                " failed: ", buf.failed() ? std::strerror(buf.saved_errno()) : "stream error");
  }
  QTUNE_CHECK(::fsync(tmp.fd) == 0, "fsync of ", tmp.path, " failed: ", errno_text());
  int rc = ::close(tmp.fd);
  tmp.fd = -1;
  QTUNE_CHECK(rc == 0, "closing ", tmp.path, " failed: ", errno_text());
  QTUNE_CHECK(::rename(tmp.path.c_str(), path.c_str()) == 0, "cannot rename ", tmp.path, " to ",
              path, ": ", errno_text());
  tmp.armed = false;
  fsync_directory(dir.string());
}

void atomic_write_string(const std::string& path, const std::string& content) {
  atomic_write(path, [&](std::ostream& os) { os.write(content.data(), content.size()); });
}

}  // namespace qtune
