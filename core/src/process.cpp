// Process-wide allocator settings, applied when libqtune_core loads.
//
// Training allocates and frees the same large activation buffers every step. glibc serves
// blocks above its mmap threshold (at most 32 MB) with fresh mmap()s and returns them on free,
// so every step page-faults its activations in again: on the virtual machines we run on that
// made a stories260K step 20x slower than the arithmetic. Keeping freed memory in the heap lets
// the next step reuse it. Set QTUNE_SYSTEM_MALLOC=1 to keep glibc's defaults.
#include "process.h"

#include <malloc.h>

#include <cstdlib>

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
}  // namespace qtune
