// TensorState: the serialisable state of a quantized weight or an adapter, as named tensors plus
// JSON metadata. Keys are relative to the owning module ("weight", "weight.absmax",
// "lora_A.weight"); the checkpoint writer prefixes them with the module path.
#pragma once

#include <map>
#include <string>

#include <torch/torch.h>

#include "qtune/options.h"

namespace qtune {

struct TensorState {
  /// Tensors by relative key. They share storage with the owner (no copy is made).
  std::map<std::string, torch::Tensor> tensors;
  /// Everything else needed to rebuild the owner: backend name, options, logical shape, ...
  Json meta = Json::object();
};

}  // namespace qtune
