// Adapters in Hugging Face PEFT's on-disk layout: adapter_config.json + adapter_model.safetensors
// with keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, so
// PeftModel.from_pretrained loads what qtune trains.
#pragma once

#include <string>

#include "qtune/export.h"
#include "qtune/model.h"

namespace qtune {

/// The PEFT module name of a short target name (q -> q_proj, output -> lm_head).
QTUNE_API std::string peft_module_name(const std::string& short_name);

/// Writes every adapter of `model` into `dir` (created if needed), atomically per file.
/// `base_model` goes to base_model_name_or_path. Throws UserError when the model has no adapter.
QTUNE_API void save_peft_adapter(const std::string& dir, const LlamaForCausalLMImpl& model,
                                 const std::string& base_model);

/// Loads a PEFT adapter directory into the adapters of `model` (same targets, ranks and shapes);
/// throws UserError naming the file and key for anything missing or mismatched.
QTUNE_API void load_peft_adapter(const std::string& dir, LlamaForCausalLMImpl& model);

}  // namespace qtune
