// Output directories that never lose work: an exclusive lock for the life of a run, and the
// refusals that keep one result from being mixed with, or written over, another.
#pragma once

#include <string>
#include <vector>

#include "qtune/export.h"

namespace qtune {

/// An exclusive lock on `dir` (created if needed) held until destruction: flock(2) on
/// `<dir>/.qtune.lock`, which records the holder (program, pid, host, start time). The kernel
/// drops the lock when its process ends however it ends, so a lock left by a killed run is simply
/// taken over. A second holder is refused with a UserError naming `what` (e.g. "output_dir"),
/// the directory and the current holder.
class QTUNE_API DirectoryLock {
 public:
  DirectoryLock(const std::string& dir, const std::string& what);
  ~DirectoryLock();
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

 private:
  int fd_ = -1;
};

/// The name of the lock file DirectoryLock keeps inside a directory.
QTUNE_API const char* directory_lock_name();

/// For programs that write a whole directory (export, quantize, convert): `dir` must not be, or
/// hold, any of `inputs` (files or directories; a file input protects its own directory), and must
/// be empty or absent unless `overwrite`, in which case its entries are removed first. Creates it.
/// Errors name `flag` (e.g. "--out") and the directory.
QTUNE_API void prepare_output_directory(const std::string& dir, const std::string& flag,
                                        bool overwrite, const std::vector<std::string>& inputs);

}  // namespace qtune
