// Core's cache of large CPU blocks (core/src/process.cpp): LibTorch's tensors of 1 MiB or more
// reuse a freed block of about their size, small ones bypass it, and a miss unmaps cached blocks
// before it maps, so what is mapped stays within 9/8 of the most that was live.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

#include "qtune/process.h"

using namespace qtune;

// Defined by the AddressSanitizer runtime only (it is linked into sanitizer builds).
extern "C" void __asan_init() __attribute__((weak));

namespace {

constexpr int64_t kMiB = int64_t{1} << 20;

torch::Tensor bytes(int64_t n) { return torch::empty({n}, torch::kUInt8); }

// Starts from an empty cache; false (and the test skips its checks) only in sanitizer builds,
// where ASan's allocator serves every block.
bool fresh_cache() {
  return_freed_heap(0);
  const auto s = cpu_block_cache_stats();
  const bool sanitized = &__asan_init != nullptr;
  EXPECT_EQ(s.enabled, !sanitized) << "QTUNE_SYSTEM_MALLOC must be unset for this test";
  EXPECT_EQ(s.cached_bytes, 0);
  return s.enabled;
}

}  // namespace

TEST(CpuBlockCache, AFreedBlockServesTheNextRequestOfItsSize) {
  if (!fresh_cache()) return;
  const auto s0 = cpu_block_cache_stats();
  void* first = nullptr;
  {
    auto t = bytes(3 * kMiB);
    first = t.data_ptr();
    t.fill_(7);
  }
  auto s1 = cpu_block_cache_stats();
  EXPECT_EQ(s1.misses, s0.misses + 1);
  EXPECT_EQ(s1.cached_bytes, 3 * kMiB);
  // A request a few bytes smaller is served by the same mapping, with no new one.
  auto again = bytes(3 * kMiB - 1000);
  EXPECT_EQ(again.data_ptr(), first);
  auto s2 = cpu_block_cache_stats();
  EXPECT_EQ(s2.hits, s1.hits + 1);
  EXPECT_EQ(s2.misses, s1.misses);
  EXPECT_EQ(s2.cached_bytes, 0);
  // A reused block keeps what its last tensor wrote; torch::zeros still gives zeros in it.
  again = torch::Tensor();
  auto zeros = torch::zeros({3 * kMiB}, torch::kUInt8);
  EXPECT_EQ(zeros.data_ptr(), first);
  EXPECT_EQ(zeros.sum().item<int64_t>(), 0);
}

TEST(CpuBlockCache, SmallTensorsBypassIt) {
  if (!fresh_cache()) return;
  const auto s0 = cpu_block_cache_stats();
  { auto t = bytes(kMiB - 1); }
  const auto s1 = cpu_block_cache_stats();
  EXPECT_EQ(s1.hits + s1.misses, s0.hits + s0.misses);
  EXPECT_EQ(s1.mapped_bytes, s0.mapped_bytes);
}

TEST(CpuBlockCache, AMissUnmapsCachedBlocksToStayWithinTheBudget) {
  if (!fresh_cache()) return;
  const auto s0 = cpu_block_cache_stats();
  const int64_t live0 = s0.mapped_bytes;  // other tests' tensors still alive
  {
    std::vector<torch::Tensor> four;
    for (int i = 0; i < 4; ++i) four.push_back(bytes(8 * kMiB));
  }
  const auto s1 = cpu_block_cache_stats();
  EXPECT_EQ(s1.cached_bytes, 32 * kMiB);
  EXPECT_EQ(s1.peak_live_bytes, live0 + 32 * kMiB);
  // Nothing cached fits 20 MiB, and keeping all four 8 MiB blocks beside two new 20 MiB ones
  // would map 72 MiB for 40 live: the misses unmap cached blocks, least recently freed first.
  auto a = bytes(20 * kMiB);
  auto b = bytes(20 * kMiB);
  const auto s2 = cpu_block_cache_stats();
  EXPECT_EQ(s2.misses, s1.misses + 2);
  EXPECT_GE(s2.evictions, s1.evictions + 2);
  EXPECT_EQ(s2.mapped_bytes - s2.cached_bytes, live0 + 40 * kMiB);
  EXPECT_EQ(s2.peak_live_bytes, live0 + 40 * kMiB);
  EXPECT_LE(s2.mapped_bytes, s2.peak_live_bytes + s2.peak_live_bytes / 8);
  // A block more than a quarter larger than the request is not used for it: 12 MiB does not
  // take the freed 20 MiB block ...
  b = torch::Tensor();
  auto c = bytes(12 * kMiB);
  const auto s3 = cpu_block_cache_stats();
  EXPECT_EQ(s3.misses, s2.misses + 1);
  EXPECT_EQ(s3.hits, s2.hits);
  EXPECT_LE(s3.mapped_bytes, s3.peak_live_bytes + s3.peak_live_bytes / 8);
  // ... and returning everything leaves only what is live mapped.
  a = c = torch::Tensor();
  return_freed_heap(0);
  const auto s4 = cpu_block_cache_stats();
  EXPECT_EQ(s4.mapped_bytes, live0);
  EXPECT_EQ(s4.cached_bytes, 0);
  EXPECT_EQ(s4.peak_live_bytes, live0) << "the budget restarts at what is live";
}
