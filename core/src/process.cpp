// Process-wide allocator settings, applied when libqtune_core loads; memory readings and child
// processes (see qtune/process.h).
//
// Training allocates and frees the same large activation buffers every step. Two ways of serving
// them fail at 7B width:
// - glibc's defaults map blocks above its mmap threshold (at most 32 MB) afresh and unmap them on
//   free, so every step page-faults its activations in again: that made a stories260K step 20x
//   slower than the arithmetic on our VMs, and a 7B:2 LoRA step 35% slower.
// - Keeping every freed block in the heap (M_MMAP_MAX=0, what core did until 2 December) is fast
//   but fragments: blocks of different lifetimes pin each other, and each further 7B decoder layer
//   held 98-180 MB instead of the 29 MB of what it keeps (docs/benchmarks.md).
// So blocks of kLargeBlock bytes or more that LibTorch asks for are each a mapping of their own,
// kept after free in a cache by size (like PyTorch's CUDA caching allocator, without splitting):
// the next step finds the same sizes again and faults nothing in. The cache may map an eighth
// more than the most that was ever live at once (counting from the last release: a built model's
// weights do not widen it); a miss beyond that first unmaps cached blocks, least recently freed
// first. (Without the eighth, a 7B:2 step kept missing: 114 of its 828
// large requests mapped anew, each miss evicting a block a later request wanted.) Smaller
// blocks come from glibc's heap, with a fixed mmap threshold at the same size.
// QTUNE_SYSTEM_MALLOC=1 keeps glibc's defaults and LibTorch's own allocator.
#include "qtune/process.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <fcntl.h>
#include <malloc.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>

#include <torch/version.h>

#include "qtune/error.h"

extern char** environ;

namespace qtune {
namespace {

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

constexpr size_t kLargeBlock = size_t{1} << 20;
constexpr size_t kPage = 4096;

// A cached block serves a request of up to 1/4 less than its size.
bool fits(size_t block, size_t request) { return block - block / 4 <= request; }

// Sizes are rounded up to 1/8 of their power of two (at most 12.5% more), so requests that differ
// by a few bytes share blocks.
size_t block_size_for(size_t n) {
  size_t pow2 = kLargeBlock;
  while (pow2 * 2 <= n) pow2 *= 2;
  const size_t step = std::max(kPage, pow2 / 8);
  return (n + step - 1) / step * step;
}

class LargeBlockCache final : public c10::Allocator {
 public:
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
  c10::DataPtr allocate(size_t n) override { return allocate_block(n); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
#else
  c10::DataPtr allocate(size_t n) const override { return allocate_block(n); }
#endif
  // LibTorch's scratch buffers use raw_allocate/raw_deallocate, which need one deleter for all.
  c10::DeleterFnPtr raw_deleter() const override { return &LargeBlockCache::deleter; }

  CpuBlockCacheStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    CpuBlockCacheStats s = stats_;
    s.enabled = true;
    return s;
  }

  // Unmaps every cached block when more than `slack` bytes are cached. With nothing cached, the
  // budget restarts at what is live now (a build's transients must not widen the training's).
  void release_cached(size_t slack) {
    std::lock_guard<std::mutex> lock(mu_);
    if (static_cast<size_t>(stats_.cached_bytes) > slack)
      while (!lru_.empty()) evict_oldest();
    if (lru_.empty()) stats_.peak_live_bytes = base_live_ = stats_.mapped_bytes;
  }

 private:
  struct Block {
    size_t size = 0;
    std::list<void*>::iterator lru;  // valid while free
    std::multimap<size_t, void*>::iterator by_size;
  };

  c10::DataPtr allocate_block(size_t n) const {
    void* p = n < kLargeBlock ? c10::alloc_cpu(n)  // what LibTorch's own allocator does
                              : const_cast<LargeBlockCache*>(this)->take(block_size_for(n));
    return {p, p, &LargeBlockCache::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.lower_bound(size);
    if (it != free_.end() && fits(it->first, size)) {
      void* p = it->second;
      Block& b = blocks_.at(p);
      free_.erase(it);
      lru_.erase(b.lru);
      stats_.cached_bytes -= static_cast<int64_t>(b.size);
      stats_.peak_live_bytes = std::max(stats_.peak_live_bytes, live_bytes());
      ++stats_.hits;
      return p;
    }
    // Room for the new block within the budget: the most that was ever live, plus an eighth of
    // what that peak holds beyond the blocks live at the last release (a model's weights).
    stats_.peak_live_bytes =
        std::max(stats_.peak_live_bytes, live_bytes() + static_cast<int64_t>(size));
    const int64_t budget =
        stats_.peak_live_bytes + (stats_.peak_live_bytes - base_live_) / 8;
    while (!lru_.empty() && stats_.mapped_bytes + static_cast<int64_t>(size) > budget)
      evict_oldest();
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      // LibTorch turns this into its out-of-memory error, as for a failed malloc.
      TORCH_CHECK(false, "cannot map ", size, " bytes for a tensor: ", std::strerror(errno));
    }
    blocks_[p].size = size;
    ++stats_.misses;
    stats_.mapped_bytes += static_cast<int64_t>(size);
    stats_.peak_mapped_bytes = std::max(stats_.peak_mapped_bytes, stats_.mapped_bytes);
    return p;
  }

  // False when `p` is not one of the cache's blocks (a small one).
  bool give_back(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    auto node = blocks_.find(p);
    if (node == blocks_.end()) return false;
    Block& b = node->second;
    b.lru = lru_.insert(lru_.end(), p);
    b.by_size = free_.emplace(b.size, p);
    stats_.cached_bytes += static_cast<int64_t>(b.size);
    return true;
  }

  int64_t live_bytes() const { return stats_.mapped_bytes - stats_.cached_bytes; }  // mu_ held

  void evict_oldest() {  // with mu_ held
    void* p = lru_.front();
    lru_.pop_front();
    auto node = blocks_.find(p);
    const size_t size = node->second.size;
    free_.erase(node->second.by_size);
    blocks_.erase(node);
    munmap(p, size);
    stats_.cached_bytes -= static_cast<int64_t>(size);
    stats_.mapped_bytes -= static_cast<int64_t>(size);
    ++stats_.evictions;
  }

  static void deleter(void* p);

  mutable std::mutex mu_;
  std::unordered_map<void*, Block> blocks_;  // every mapped block
  std::multimap<size_t, void*> free_;        // cached blocks by size
  std::list<void*> lru_;                     // cached blocks, least recently freed first
  CpuBlockCacheStats stats_;
  int64_t base_live_ = 0;  // live at the last release_cached
};

// Tensors may be freed during static destruction, after any cache object would be gone: the
// cache lives for the whole process.
LargeBlockCache* g_cache = nullptr;

void LargeBlockCache::deleter(void* p) {
  if (!g_cache->give_back(p)) c10::free_cpu(p);
}

struct AllocatorSetup {
  AllocatorSetup() {
    const char* keep = std::getenv("QTUNE_SYSTEM_MALLOC");
    if (keep && *keep && *keep != '0') return;
    if (kSanitized) return;  // ASan's allocator checks every block; mappings of ours would not be
    mallopt(M_MMAP_THRESHOLD, static_cast<int>(kLargeBlock));  // fixed, not glibc's sliding one
    mallopt(M_TRIM_THRESHOLD, 256 << 20);  // the heap holds small blocks only; keep them
    mallopt(M_TOP_PAD, 64 << 20);          // grow the heap in 64 MB steps
    g_cache = new LargeBlockCache();
    c10::SetCPUAllocator(g_cache, /*priority=*/1);
  }
};
const AllocatorSetup kAllocatorSetup;

}  // namespace

void return_freed_heap(size_t slack_bytes) {
  if (g_cache) g_cache->release_cached(slack_bytes);
  if (mallinfo2().fordblks > slack_bytes) malloc_trim(0);
}

CpuBlockCacheStats cpu_block_cache_stats() {
  return g_cache ? g_cache->stats() : CpuBlockCacheStats{};
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
