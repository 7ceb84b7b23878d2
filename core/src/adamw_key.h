// The key of a parameter in LibTorch's optimizer state map (internal to core).
#pragma once

#include <torch/torch.h>

#include <sstream>
#include <string>
#include <type_traits>

namespace qtune::detail {

// AdamW's per-parameter state map is keyed by the parameter's TensorImpl: as a string in
// LibTorch 1.x, as the pointer itself in 2.x. The key type is read off the map.
template <typename Map>
typename Map::key_type optimizer_key(const Map&, const torch::Tensor& p) {
  using Key = typename Map::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    // What LibTorch 1.x builds with c10::guts::to_string: the pointer streamed in hex.
    std::ostringstream os;
    os << p.unsafeGetTensorImpl();
    return os.str();
  } else {
    return static_cast<Key>(p.unsafeGetTensorImpl());
  }
}

}  // namespace qtune::detail
