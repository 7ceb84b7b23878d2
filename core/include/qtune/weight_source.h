// WeightSource: where a model's full-precision weights come from, by Hugging Face Llama name
// ("model.layers.0.self_attn.q_proj.weight"). Safetensors directories, llama2.c checkpoints and
// synthetic random models all present themselves this way, so the model builder can quantize
// layer by layer while loading without knowing the file format.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "qtune/export.h"
#include "qtune/model_config.h"
#include "qtune/tensor_state.h"

namespace qtune {

class QTUNE_API WeightSource {
 public:
  virtual ~WeightSource();
  /// Where the weights come from, for messages.
  virtual std::string describe() const = 0;
  virtual bool has(const std::string& name) const = 0;
  /// Shape without loading the data.
  virtual std::vector<int64_t> shape(const std::string& name) const = 0;
  /// A fresh, contiguous CPU tensor in `dtype` (a copy: the caller may keep or drop it).
  /// Throws UserError naming the tensor and the source when it is missing.
  virtual torch::Tensor get(const std::string& name, torch::ScalarType dtype) const = 0;
  /// Every tensor name.
  virtual std::vector<std::string> names() const = 0;
  /// The floating dtype `name` is stored in, where the source knows it without reading the data
  /// (a frozen tensor that is only looked up can stay in it); nullopt otherwise.
  virtual std::optional<torch::ScalarType> stored_dtype(const std::string& name) const {
    (void)name;
    return std::nullopt;
  }

  /// A pre-quantized directory (written by qtune-quantize) also holds packed states: when
  /// has_quantized(name) is true, quantized(name) returns the TensorState to hand to
  /// QuantBackend::load (meta holds "backend"), and get(name) may be unavailable.
  virtual bool has_quantized(const std::string& name) const { return false; }
  virtual TensorState quantized(const std::string& name) const;
};

/// What every weight a model is built from must pass, checked as it is read: `t` (the values
/// read) holds only finite numbers. Throws UserError naming `where` (the file) and `name`.
QTUNE_API void check_finite_weight(const torch::Tensor& t, const std::string& where,
                                   const std::string& name);

/// A model on disk: its architecture and its weights. `tokenizer_path` is the tokenizer found
/// beside the model (tokenizer.model in an HF directory), empty when there is none.
struct QTUNE_API ModelFiles {
  ModelConfig config;
  std::unique_ptr<WeightSource> weights;
  std::string tokenizer_path;
};

/// Opens a Hugging Face directory (config.json + model.safetensors or a sharded index) or a
/// llama2.c .bin checkpoint. Weights stay memory-mapped until get() is called. Throws UserError
/// naming the path and what is wrong.
QTUNE_API ModelFiles open_model(const std::string& path);

}  // namespace qtune
