// The process this code runs in: memory readings (resident and peak set size), the allocator
// policy of core, and running a child program. Small on purpose: what the trainer's summary and
// the benchmark programs read, and nothing that only one program needs.
#pragma once

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

/// Loaders call this after each matrix they quantize. Core keeps freed heap for the training
/// loop's reuse (process.cpp), but while a model is quantized the small results pin the freed
/// full-precision copies in place and the heap grows by one copy per matrix: the build of a 250M
/// QLoRA model peaked at 1034 MB for a 379 MB result. This returns the free heap to the system
/// once more than 256 MB of it has piled up (then 558 MB).
QTUNE_API void return_freed_heap();

}  // namespace qtune
