// Starting the ranks of a single-machine data-parallel job from inside a program, the way
// `torchrun --standalone --nproc_per_node N` does: each rank is the same program with torchrun's
// environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free
// MASTER_PORT), so a rank joins its group exactly as it would under torchrun.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qtune/export.h"

namespace qtune {

/// How a local launch goes.
struct LaunchOptions {
  int64_t nproc = 2;  ///< ranks to start (>= 1)
  /// After the first rank fails, how long the others get to notice and exit on their own before
  /// they are killed (SIGKILL); the trainer passes dist.timeout_s plus a margin.
  double grace_s = 60;
  /// Extra "KEY=value" entries for every rank's environment (after torchrun's variables).
  std::vector<std::string> env;
};

/// Runs `args` (args[0] is the program: an absolute path, or a name looked up in PATH) as
/// `options.nproc` ranks and waits for all of them. SIGINT and SIGTERM received meanwhile are
/// forwarded to every rank still running. Returns 0 when every rank exits 0, else the status of
/// the first rank to fail: its exit code, or 128 + the signal that ended it. Throws UserError when
/// nproc < 1, when RANK is already set (a launcher inside a launcher) or a rank cannot start.
QTUNE_API int launch_local_ranks(const std::vector<std::string>& args,
                                 const LaunchOptions& options);

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
QTUNE_API int free_local_port();

}  // namespace qtune
