// Adapters in Hugging Face PEFT's on-disk layout: adapter_config.json + adapter_model.safetensors
// with keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, so
// PeftModel.from_pretrained loads what qtune trains.
//
// What qtune needs beyond PEFT's fields to rebuild the exact training setup (the adapter plugin
// and its options, the quantized base's backend and options, the base model's fingerprint, the
// tokenizer) travels as one JSON string under the key "qtune" of adapter_model.safetensors'
// __metadata__. PEFT loads the tensors and ignores the metadata; an extra adapter_config.json
// key would make recent PEFT versions warn about "unexpected keyword arguments".
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "qtune/export.h"
#include "qtune/model.h"
#include "qtune/options.h"

namespace qtune {

/// The PEFT module name of a short target name (q -> q_proj, output -> lm_head).
QTUNE_API std::string peft_module_name(const std::string& short_name);

/// Every adapter tensor of `model` under its PEFT key, in slot order. The tensors share storage
/// with the adapters (no copy).
QTUNE_API std::vector<std::pair<std::string, torch::Tensor>> peft_adapter_tensors(
    const LlamaForCausalLMImpl& model);

/// Writes every adapter of `model` into `dir` (created if needed), atomically per file.
/// `base_model` goes to base_model_name_or_path. `qtune_info` (when not null) is stored as the
/// "qtune" metadata of adapter_model.safetensors: {"identity": run_identity(...), "tokenizer":
/// path, ...}. Throws UserError when the model has no adapter.
QTUNE_API void save_peft_adapter(const std::string& dir, const LlamaForCausalLMImpl& model,
                                 const std::string& base_model, const Json& qtune_info = Json());

/// adapter_config.json of `dir`, checked to be a JSON object with a string "peft_type". Throws
/// UserError naming the file otherwise.
QTUNE_API Json read_peft_config(const std::string& dir);
/// The "qtune" metadata save_peft_adapter stored, or null (an adapter from another tool).
QTUNE_API Json read_peft_qtune_info(const std::string& dir);

/// Loads a PEFT adapter directory into the adapters of `model` (same targets, ranks and shapes).
/// When `base_identity` (base_identity() of the model's base) is given and the adapter records
/// the base it was trained on, a different base is refused. Throws UserError naming the file,
/// the tensor and both shapes / both base models for anything missing or mismatched.
QTUNE_API void load_peft_adapter(const std::string& dir, LlamaForCausalLMImpl& model,
                                 const Json& base_identity = Json());

}  // namespace qtune
