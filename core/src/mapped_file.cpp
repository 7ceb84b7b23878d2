// Internal read-only file mapping (see mapped_file.h).
#include "mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "qtune/error.h"

namespace qtune::detail {

std::shared_ptr<MappedFile> MappedFile::open(const std::string& path, const std::string& what) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  QTUNE_CHECK(fd >= 0, "cannot open ", what, " ", path, ": ", std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw UserError(what + " " + path + " is not a regular file");
  }
  std::shared_ptr<MappedFile> m(new MappedFile());
  m->path_ = path;
  m->size_ = static_cast<size_t>(st.st_size);
  if (m->size_ > 0) {
    void* addr = ::mmap(nullptr, m->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    ::close(fd);
    QTUNE_CHECK(addr != MAP_FAILED, "cannot mmap ", what, " ", path, ": ", std::strerror(err));
    m->addr_ = addr;
  } else {
    ::close(fd);
  }
  return m;
}

MappedFile::~MappedFile() {
  if (addr_) ::munmap(addr_, size_);
}

}  // namespace qtune::detail
