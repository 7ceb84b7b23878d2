// Pre-quantized model directories: what `qtune-quantize` writes and `trainer --train_type qlora`
// loads without requantizing. An HF-style directory whose config.json carries
//   "quantization_config": {"quant_method": "qtune", "backend": <name>, "options": {...},
//                           "skip_output": bool, "format_version": 1}
// and whose model.safetensors holds, for every quantized projection <P> (e.g.
// model.layers.0.self_attn.q_proj), the backend's state tensors under <P>.<key> (NF4:
// <P>.weight, <P>.weight.absmax, <P>.weight.quant_map, ... — bitsandbytes' names) and the state's
// JSON meta in the file's __metadata__ under "qtune:<P>.weight". Embeddings and norms (and a
// skipped head) are stored dense.
#pragma once

#include <string>
#include <vector>

#include "qtune/export.h"
#include "qtune/model_config.h"
#include "qtune/options.h"
#include "qtune/quantized_weight.h"
#include "qtune/weight_source.h"

namespace qtune {

/// Quantizes every projection of `weights` (layer by layer: one full-precision matrix in memory
/// at a time) with `backend` and resolved `options`, and writes the directory described above
/// to `dir` (atomically per file). Dense tensors are stored in `dense_dtype`. A tied model's
/// head is stored quantized too (as lm_head.*) unless `skip_output`. Projections matching
/// `skip_modules` (module_matches) are stored dense, and stay dense when trained. Returns bytes
/// of the quantized projections.
QTUNE_API int64_t save_quantized_model(const std::string& dir, const ModelConfig& config,
                                       const WeightSource& weights, const QuantBackend& backend,
                                       const Json& options, bool skip_output,
                                       torch::ScalarType dense_dtype,
                                       const std::string& tokenizer_path = "",
                                       const std::vector<std::string>& skip_modules = {});

/// True when config.json `config` describes a qtune pre-quantized directory.
QTUNE_API bool is_quantized_config(const Json& config);

/// The weights of a pre-quantized directory: dense tensors through get(), packed projections
/// through has_quantized()/quantized(). Throws UserError naming the file for missing meta.
QTUNE_API std::unique_ptr<WeightSource> open_quantized_dir(const std::string& dir,
                                                           const Json& config_json);

}  // namespace qtune
