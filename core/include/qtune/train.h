// The one training recipe for every train type: data -> model -> AdamW over trainable
// parameters -> loop with gradient accumulation, clipping, warmup + cosine schedule, periodic
// evaluation, JSONL metrics, progress, crash-safe checkpoints and exact resume (checkpoint.h),
// adapter/model export and a run summary.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "qtune/export.h"
#include "qtune/model.h"
#include "qtune/options.h"
#include "qtune/registry.h"

namespace qtune {

/// Learning rate at optimizer step `step` (1-based): linear warmup to `lr` over `warmup` steps,
/// then cosine decay to lr * min_ratio at `total`.
QTUNE_API double lr_at(int64_t step, int64_t total, int64_t warmup, double lr, double min_ratio);

/// Everything resolved from a recipe before any large allocation: paths, plugins, options.
struct QTUNE_API ResolvedRecipe {
  Json recipe;  // the complete, checked recipe (written to output_dir/recipe.json)
  std::string model_path;
  std::string tokenizer_path;
  std::string data_path;
  std::string val_path;  // empty = split off val_fraction
  TuningSpec spec;       // plugins looked up and their options resolved
};

/// Checks a complete recipe (see recipe.h) and resolves paths and plugins from `registry`.
/// Throws UserError naming the key for any problem.
QTUNE_API ResolvedRecipe resolve_recipe(const Json& recipe, const Registry& registry);

/// A model built from a resolved recipe: opens the model files and builds the slots.
QTUNE_API LlamaForCausalLM build_model(const ResolvedRecipe& r);

class QTUNE_API Trainer {
 public:
  explicit Trainer(ResolvedRecipe recipe);
  /// Runs to max_steps (or until request_stop()); returns the summary that it also writes to
  /// output_dir/summary.json. Checkpoints go to output_dir/checkpoints every checkpoint.every
  /// steps, at the end and when stopped (summary "checkpoint" names the last one).
  ///
  /// With recipe key `resume` ("latest" = output_dir/checkpoints/latest, or a checkpoint
  /// directory) the run continues from that checkpoint: trainable weights, AdamW moments, step
  /// (and so the LR schedule), data-loader position and the CPU RNG state are restored; the
  /// base model, train type, quant backend/options and adapter/options must match the
  /// checkpoint's (UserError naming both values otherwise). metrics.jsonl keeps the records up to
  /// the checkpoint's step and continues after them. On CPU with fp32 and a fixed thread count,
  /// the resumed steps' losses equal an uninterrupted run's bit for bit.
  Json run();
  /// Asks a running trainer to stop after the current step and save a checkpoint (signal-safe).
  static void request_stop();
  /// Whether request_stop() was called since run() started.
  static bool stop_requested();

  /// Called with every metrics record (also appended to output_dir/metrics.jsonl).
  std::function<void(const Json&)> on_metrics;

 private:
  ResolvedRecipe r_;
};

/// Peak resident set size of this process image in bytes (VmHWM of /proc/self/status, which
/// restarts at exec, unlike getrusage's ru_maxrss).
QTUNE_API int64_t peak_rss_bytes();

}  // namespace qtune
