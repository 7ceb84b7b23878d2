// Helpers shared by the bench_*.cpp files (not installed): timing, thread setup, child
// processes, memory readings and small formatting utilities.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "bench.h"
#include "qtune/process.h"

namespace qtune::bench_detail {

/// Waits for every queued kernel on `device` (no-op on CPU), so a timer brackets real work.
void sync(const torch::Device& device);

/// Median wall time in seconds of `repeats` calls of `fn` after `warmup` untimed ones.
double median_seconds(const std::function<void()>& fn, int warmup, int repeats,
                      const torch::Device& device);

/// Medians of `a` and `b` timed alternately (a, b, a, b, ...) after `warmup` runs of each: the
/// two halves of a ratio see the same machine state, which matters on a shared machine.
std::pair<double, double> paired_medians(const std::function<void()>& a,
                                         const std::function<void()>& b, int warmup, int repeats,
                                         const torch::Device& device);

/// Median of `v` (NaN when empty).
double median(std::vector<double> v);

/// Sets LibTorch's intra-op threads to `threads` (0 = every core) and returns the count in use.
int apply_threads(int threads);

/// The last non-empty line of a file (what a failed child printed last), at most 300 chars.
std::string last_line(const std::string& path);

/// A folder for child runs: options.work_dir, or a fresh /tmp/qtune-bench-XXXXXX that is
/// removed on destruction unless options.keep_runs.
class WorkDir {
 public:
  explicit WorkDir(const BenchOptions& options);
  ~WorkDir();
  WorkDir(const WorkDir&) = delete;
  WorkDir& operator=(const WorkDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  bool remove_ = false;
};

/// The first line of an exception's message (c10::Error without its backtrace).
std::string first_line(const std::exception& e);

/// "quant nbits=2" -> "quant_nbits_2": a file-name-safe slug.
std::string slug(const std::string& text);

/// A gnuplot string literal (single-quoted; quotes doubled).
std::string gp_quote(const std::string& text);

/// The rows of `table` as a gnuplot inline datablock ($name << EOD ... EOD) holding the given
/// columns, whitespace-separated, strings double-quoted; rows where `keep` is false are left out.
std::string gp_datablock(const std::string& name, const BenchTable& table,
                         const std::vector<std::string>& columns,
                         const std::function<bool(size_t row)>& keep = {});

/// The common preamble of every plot: pngcairo terminal of `width` x `height`, output file.
std::string gp_preamble(const std::string& png, int width, int height);

/// The adapter factory the options name (or the first adapter plugin found); throws UserError.
std::shared_ptr<AdapterFactory> pick_adapter(const BenchOptions& options, const Registry& registry);

/// A --matrices entry: "model", or kind "gaussian" / "student_t" with a shape. Throws
/// UserError naming the entry.
struct MatrixSpec {
  std::string kind;
  int64_t out = 0, in = 0;
};
MatrixSpec parse_matrix_spec(const std::string& spec);

/// The child sides of bench_child_main (bench_train.cpp).
int finetune_child(const std::string& recipe_path, const Registry& registry);
int scale_child(const std::string& spec_path, const std::string& result_path,
                const Registry& registry);
int synthesize_child(const std::string& spec_path);

}  // namespace qtune::bench_detail
