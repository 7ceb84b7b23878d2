// Run identity: what a checkpoint or an adapter is only valid with — a fingerprint of the base
// model that does not depend on its file format or location, and the tuning spec of the run.
// Resume, export, generation and PEFT loading check it before they use trained weights.
#pragma once

#include <string>

#include "qtune/export.h"
#include "qtune/model_config.h"
#include "qtune/options.h"
#include "qtune/tuning_spec.h"
#include "qtune/weight_source.h"

namespace qtune {

/// A fingerprint of a base model that does not depend on the file format or location:
///   {"path": model_path, "source": weights.describe(),
///    "config": the architecture fields of config.json (hidden_size, layers, heads, vocab, ...),
///    "dense_hash": hash of the embedding and norm weights (sampled rows, rounded to bf16),
///    "linear_hash": hash of sampled rows of every projection, or null when the source holds
///                   some projection only quantized (a qtune-quantize directory)}
/// Rounding to bf16 before hashing makes an fp32 model and its bf16 copy the same base; a
/// llama2.c file and its qtune-convert HF directory are the same base too. Reads a few rows per
/// tensor (memory-mapped sources are not copied whole).
QTUNE_API Json base_identity(const std::string& model_path, const ModelConfig& config,
                             const WeightSource& weights);

/// How a pre-quantized source (a qtune-quantize directory) was quantized: {"backend", "options"}
/// from the state meta of its first quantized projection; null for a dense source.
QTUNE_API Json prequantized_options(const WeightSource& weights);

/// The identity of a training run:
///   {"train_type", "dtype", "quant", "quant_options", "quant_skip_output", "adapter",
///    "adapter_options", "target_modules", "base": base_identity(...)}
/// (quant* null unless qlora, adapter* null under full).
QTUNE_API Json run_identity(const TuningSpec& spec, const Json& base);

/// Throws UserError when `recorded` (from a checkpoint or adapter) and `current` differ in the
/// base model, train type, quant backend or options, or adapter or options. The message starts
/// with `what` ("cannot resume from DIR") and names the field and both values. Differences in
/// "dtype" are allowed (the masters and moments are fp32 either way).
QTUNE_API void check_run_identity(const Json& recorded, const Json& current,
                                  const std::string& what);

/// Only the base part of check_run_identity: throws UserError naming both models and the first
/// difference (architecture field, or which weights differ).
QTUNE_API void check_base_identity(const Json& recorded, const Json& current,
                                   const std::string& what);


}  // namespace qtune
