// Names of the tensors of a Llama checkpoint, shared by the readers and writers of
// pre-quantized directories (qtune's own and bitsandbytes').
#pragma once

#include <string>

namespace qtune::detail {

/// "<module>.weight" -> "<module>" (the key prefix a quantized state is stored under).
inline std::string module_of(const std::string& weight_name) {
  return weight_name.substr(0, weight_name.size() - std::string(".weight").size());
}

}  // namespace qtune::detail
