// Training checkpoints that survive crashes: the state file, atomic save and exact load. What a
// checkpoint is only valid with is its run identity (run_identity.h); rebuilding a model from a
// checkpoint or adapter for export and generation is trained_model.h.
//
// A checkpoint is a directory <output_dir>/checkpoints/step-<N>/ holding
//   adapter_config.json + adapter_model.safetensors   adapter runs: the adapters in PEFT layout
//                                                      (so a checkpoint is also an adapter dir)
//   trainable.safetensors   trainable parameters no adapter file holds (full runs: all of them),
//                           keyed by module path ("model.layers.0.mlp.up_proj.weight")
//   optimizer.safetensors   AdamW moments per parameter path: "<path>.exp_avg",
//                           "<path>.exp_avg_sq" (fp32, the parameter's shape) and "<path>.step"
//                           (int64 scalar)
//   trainer_state.json      format magic + version, step, data-loader position, CPU RNG state,
//                           progress (tokens, eval losses), the recipe, the run identity (base
//                           model fingerprint, train type, quant backend + options, adapter +
//                           options) and where each trainable parameter is stored
// The base model is never stored: under lora/qlora it is reloaded (and requantized) from the
// model the identity names. The directory is written under a temporary name, every file and the
// directory are fsynced, then it is renamed into place, the parent is fsynced and the `latest`
// pointer file is replaced atomically: a crash or a full disk at any moment leaves the previous
// checkpoint and `latest` intact. See docs/checkpoints.md.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

#include "qtune/export.h"
#include "qtune/model.h"
#include "qtune/options.h"
#include "qtune/run_identity.h"
#include "qtune/weight_source.h"

namespace qtune {

/// trainer_state.json's "format" and "version"; a reader refuses other values with a message
/// saying what to do.
inline constexpr const char* kCheckpointFormat = "qtune-checkpoint";
inline constexpr int kCheckpointVersion = 1;

// ---------------------------------------------------------------------------------------------
// Saving and loading

/// Everything a checkpoint holds besides tensors (trainer_state.json).
struct QTUNE_API CheckpointState {
  int64_t step = 0;                ///< optimizer steps completed
  Json loader = Json::object();    ///< DataLoader::state().to_json(): the next batch
  Json rng = Json::object();       ///< capture_rng_state()
  Json progress = Json::object();  ///< tokens, train_seconds, first/best/last val loss
  Json recipe = Json::object();    ///< the complete recipe of the run
  Json identity = Json::object();  ///< run_identity()
  std::string tokenizer;           ///< the tokenizer the run used (for export and generation)
  Json storage = Json::object();   ///< filled by save/read: {param path: {"file", "key"}}

  Json to_json() const;
  /// Checks "format" and "version" and the field types; `origin` (the file) is named in errors.
  static CheckpointState from_json(const Json& j, const std::string& origin);
};

/// The default CPU generator's state as {"cpu": "<hex bytes>"}.
QTUNE_API Json capture_rng_state();
/// Restores what capture_rng_state() returned; throws UserError on a malformed value.
QTUNE_API void restore_rng_state(const Json& rng);

/// Writes checkpoint `state.step` of `model` and `optimizer` under `root` (created if needed):
/// root/.step-<N>.tmp-XXXXXX first, renamed to root/step-<N> when complete (an existing step-<N>
/// is replaced atomically), then root/latest = "step-<N>", then every step-<M> with M <= N beyond
/// the newest `keep` is removed (checkpoints of a later, abandoned timeline are left alone).
/// Leftover temporary directories of an interrupted save are removed first. `base_model` goes
/// to the adapter's base_model_name_or_path. On any error the temporary directory is removed,
/// the previous checkpoints and `latest` are untouched and the error propagates (I/O errors as
/// UserError naming the path). Returns the checkpoint directory.
QTUNE_API std::string save_checkpoint(const std::string& root, const LlamaForCausalLMImpl& model,
                                      const torch::optim::AdamW& optimizer,
                                      const CheckpointState& state, int64_t keep,
                                      const std::string& base_model);

/// The checkpoint directory `spec` names: "latest" -> the directory root/latest points to (or,
/// when the pointer is missing or dangling, the complete step-<N> with the largest N, with a
/// warning); anything else is a directory path. Throws UserError when there is no checkpoint.
QTUNE_API std::string resolve_checkpoint(const std::string& spec, const std::string& root);

/// Whether `dir` holds a checkpoint (a trainer_state.json), rather than an adapter alone.
QTUNE_API bool is_checkpoint_dir(const std::string& dir);

/// Reads dir/trainer_state.json (format and version checked). Throws UserError naming the file.
QTUNE_API CheckpointState read_checkpoint_state(const std::string& dir);

/// Copies the trainable parameters and AdamW moments of checkpoint `dir` into `model` and
/// `optimizer` (exact: same dtype, no rounding). Every trainable parameter must be in the
/// checkpoint with its shape, and every stored parameter must exist in the model; throws
/// UserError naming the file, the parameter and both shapes otherwise. Moments are kept only for
/// the parameters `optimizer` steps (a dist.shard_optimizer rank's own), though all are checked.
QTUNE_API void load_checkpoint_tensors(const std::string& dir, const CheckpointState& state,
                                       LlamaForCausalLMImpl& model, torch::optim::AdamW& optimizer);

/// Only the trainable parameters (for inference and export of a checkpoint).
QTUNE_API void load_checkpoint_weights(const std::string& dir, const CheckpointState& state,
                                       LlamaForCausalLMImpl& model);

namespace detail {
/// Test-only fault injection, driven by environment variables (documented in
/// docs/checkpoints.md). At `point` ("step", "save") of step `step`:
///   QTUNE_DEBUG_PAUSE=<point>@<step>  creates `marker_dir`/.qtune-debug-paused and sleeps (up to
///                                     5 minutes, or until `interrupted()` returns true), so a
///                                     test can kill the process at a known moment;
///   QTUNE_DEBUG_FAIL=<point>@<step>   throws UserError("injected failure ...").
QTUNE_API void debug_point(const std::string& point, int64_t step, const std::string& marker_dir,
                           bool (*interrupted)() = nullptr);
}  // namespace detail

}  // namespace qtune
