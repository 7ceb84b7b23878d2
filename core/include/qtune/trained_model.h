// Rebuilding a trained model from what training wrote (a checkpoint, a PEFT adapter directory —
// qtune's or another tool's — or a base alone), for qtune-export and qtune-generate.
#pragma once

#include <string>

#include <torch/torch.h>

#include "qtune/export.h"
#include "qtune/model.h"
#include "qtune/options.h"
#include "qtune/registry.h"

namespace qtune {

/// What to rebuild.
struct QTUNE_API TrainedModelOptions {
  /// Base model; empty = the one the adapter or checkpoint records.
  std::string model_path;
  /// A PEFT adapter directory (qtune's or any HF PEFT LoRA) or a checkpoint directory; empty =
  /// the base model alone.
  std::string adapter_dir;
  /// Quantize the base with this backend. Only for the base alone or a foreign PEFT adapter;
  /// qtune adapters and checkpoints rebuild the base the way they were trained, and a
  /// pre-quantized base is used as it was quantized.
  std::string quant;
  Json quant_options = Json::object();
  /// Compute dtype.
  torch::ScalarType dtype = torch::kFloat32;
};

/// A model rebuilt for inference or export, with what it was built from.
struct QTUNE_API TrainedModel {
  LlamaForCausalLM model{nullptr};
  ModelConfig config;
  std::string base_path;       ///< the base model opened
  std::string tokenizer_path;  ///< recorded by training, else beside the base; may be empty
  Json identity;               ///< the recorded run identity; null for a foreign PEFT adapter
};

/// Opens the base, rebuilds its slots as training did (quantized with the recorded backend and
/// options under qlora), and loads the adapter or checkpoint weights. Refuses (UserError naming
/// both) a base whose fingerprint differs from the recorded one, or whose shapes do not fit the
/// adapter. Plugins come from `registry`.
QTUNE_API TrainedModel load_trained_model(const TrainedModelOptions& options,
                                          const Registry& registry);

}  // namespace qtune
