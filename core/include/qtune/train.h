// The one training recipe for every train type: data -> model -> AdamW over trainable
// parameters -> loop with gradient accumulation, clipping, warmup + cosine schedule, periodic
// evaluation, JSONL metrics, progress, crash-safe checkpoints and exact resume (checkpoint.h),
// adapter/model export and a run summary.
//
// A run is a short list of named steps (train.cpp): setup() opens the model files and the
// tokenizer, loads the data, builds the model from the tuning spec and the optimizer; resume()
// restores a checkpoint; then step() per optimizer step, evaluate() and save() when due, and
// finally the outputs and summary().
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "qtune/export.h"
#include "qtune/model.h"
#include "qtune/options.h"
#include "qtune/recipe.h"
#include "qtune/registry.h"
#include "qtune/tuning_spec.h"

namespace qtune {

/// Learning rate at optimizer step `step` (1-based): linear warmup to `lr` over `warmup` steps,
/// then cosine decay to lr * min_ratio at `total`.
QTUNE_API double lr_at(int64_t step, int64_t total, int64_t warmup, double lr, double min_ratio);

/// Everything resolved from a recipe before any large allocation: paths, plugins, options.
struct QTUNE_API ResolvedRecipe {
  Recipe recipe;    ///< typed and checked; plugin options resolved
  Json tree;        ///< the same as a tree (written to output_dir/recipe.json)
  std::string model_path;
  std::string tokenizer_path;
  std::string data_path;
  std::string val_path;  ///< empty = split off val_fraction
  TuningSpec spec;       ///< plugins looked up and their options resolved
};

/// Checks a complete recipe tree (see recipe.h) and resolves paths and plugins from `registry`.
/// Throws UserError naming the key for any problem.
QTUNE_API ResolvedRecipe resolve_recipe(const Json& recipe, const Registry& registry);

class QTUNE_API Trainer {
 public:
  explicit Trainer(ResolvedRecipe recipe);
  ~Trainer();
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
  struct Run;  // everything one run holds: model, optimizer, data, progress, process group
  Json run_steps();
  void setup();
  void resume();
  /// One optimizer step (grad_accum micro-batches); returns its metrics record (loss = the
  /// mean micro-batch loss, lr, grad_norm, ...).
  Json step(int64_t step);
  void evaluate(int64_t step);
  void save(int64_t step);
  void emit(const Json& record);
  std::string save_outputs(int64_t steps_done);
  Json summary(int64_t steps_done, const std::string& saved);

  ResolvedRecipe r_;
  std::unique_ptr<Run> run_;
};

}  // namespace qtune
