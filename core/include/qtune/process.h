// The process this code runs in: memory readings (resident and peak set size), the allocator
// policy of core, and running a child program. Small on purpose: what the trainer's summary and
// the benchmark programs read, and nothing that only one program needs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "qtune/export.h"

namespace qtune {

/// Peak resident set size of this process image in bytes (VmHWM of /proc/self/status, which
/// restarts at exec, unlike getrusage's ru_maxrss).
QTUNE_API int64_t peak_rss_bytes();

/// Resident set size of this process now, in bytes (/proc/self/statm).
QTUNE_API int64_t current_rss_bytes();

/// Restarts the peak (VmHWM) at the current RSS (Linux >= 4.0); false when the kernel refuses.
QTUNE_API bool reset_peak_rss();

/// Runs `exe args...` (looked up on PATH when not a path) with stdout and stderr appended to
/// `log_path`, and waits for it. Returns its exit code, or 128 + the signal number when it was
/// killed. Throws UserError naming `exe` when it cannot be started.
QTUNE_API int run_child(const std::string& exe, const std::vector<std::string>& args,
                        const std::string& log_path);

/// Loaders call this after each matrix they quantize: the freed full-precision copies would
/// otherwise pile up (the build of a 250M QLoRA model once peaked at 1034 MB for a 379 MB
/// result). Once more than `slack_bytes` are free (256 MB: enough that the next matrix usually
/// reuses them without page faults, small beside the models that need it), it unmaps the cached
/// large blocks and returns glibc's free heap to the system; 0 returns everything free.
QTUNE_API void return_freed_heap(size_t slack_bytes = size_t{256} << 20);

/// Core's cache of large CPU tensor blocks (process.cpp): each block of 1 MiB or more is a
/// mapping of its own, kept after free for a later request of about its size. Byte counts are
/// of whole mappings; `enabled` is false under QTUNE_SYSTEM_MALLOC=1 and in AddressSanitizer
/// builds (all counts 0 then).
struct CpuBlockCacheStats {
  bool enabled = false;
  int64_t mapped_bytes = 0;       ///< mapped now, in use or cached
  int64_t cached_bytes = 0;       ///< of which free, kept for reuse
  int64_t peak_mapped_bytes = 0;  ///< the most mapped at once
  int64_t peak_live_bytes = 0;    ///< the most in use at once since the cache was last empty;
                                  ///< mapped stays within it plus an eighth of its growth since
  int64_t hits = 0;               ///< requests served by a cached block
  int64_t misses = 0;             ///< requests that mapped a new block
  int64_t evictions = 0;          ///< cached blocks unmapped to make room
};

/// A snapshot of the cache's counters (thread-safe).
QTUNE_API CpuBlockCacheStats cpu_block_cache_stats();

}  // namespace qtune
