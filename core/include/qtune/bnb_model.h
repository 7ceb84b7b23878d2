// Hugging Face bitsandbytes 4-bit model directories, both ways: what transformers writes for a
// model loaded with BitsAndBytesConfig(load_in_4bit=True) and saved (and what the Hub's "-bnb-4bit"
// repositories hold), and the same layout written by `qtune-quantize --format bnb`.
//
//   config.json  "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
//                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": bool,
//                "bnb_4bit_compute_dtype": ..., "bnb_4bit_quant_storage": "uint8" (or a float
//                type the packed bytes are viewed as), "llm_int8_skip_modules": [...] | null, ...}
//   model.safetensors (or shards)  for every quantized projection <P>: <P>.weight (packed 4-bit
//                codes), <P>.weight.absmax, <P>.weight.quant_map, with double quantization
//                <P>.weight.nested_absmax and <P>.weight.nested_quant_map, and
//                <P>.weight.quant_state.bitsandbytes__<type> (the QuantState JSON as bytes);
//                everything else (embeddings, norms, biases, skipped modules) dense.
//
// Core does not interpret the packed tensors: a quantized projection's tensors go, as one
// TensorState (meta "backend" = the quant type), to the quantization plugin of that name.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "qtune/export.h"
#include "qtune/model_config.h"
#include "qtune/options.h"
#include "qtune/quantized_weight.h"
#include "qtune/weight_source.h"

namespace qtune {

/// True when config.json `config` has a quantization_config with quant_method "bitsandbytes".
QTUNE_API bool is_bnb_config(const Json& config);

/// The weights of a bitsandbytes directory: dense tensors through get(), each packed projection
/// through has_quantized()/quantized() (tensor keys relative to the module: "weight",
/// "weight.absmax", ...). Throws UserError naming config.json and the key for anything but 4-bit
/// NF4 (fp4 and 8-bit are refused), and naming the tensor for an incomplete packed state.
QTUNE_API std::unique_ptr<WeightSource> open_bnb_dir(const std::string& dir,
                                                     const Json& config_json);

/// Writes `weights` as a bitsandbytes 4-bit directory in `dir`: every projection quantized with
/// `backend` (whose state() must be bitsandbytes' layout: a weight.quant_state.bitsandbytes__*
/// tensor) except the output head and the modules matching `skip_modules` (module_matches), which
/// are stored dense in `dense_dtype` and listed in llm_int8_skip_modules, as transformers expects.
/// Quantizes one matrix at a time. Returns the bytes of the quantized projections.
QTUNE_API int64_t save_bnb_model(const std::string& dir, const ModelConfig& config,
                                 const WeightSource& weights, const QuantBackend& backend,
                                 const Json& options, const std::vector<std::string>& skip_modules,
                                 torch::ScalarType dense_dtype,
                                 const std::string& tokenizer_path = "");

}  // namespace qtune
