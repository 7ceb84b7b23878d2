// Checking a TensorState against the layout a backend declares, for QuantBackend::load(): a state
// is user input (a checkpoint, a qtune-quantize directory), so every key, dtype, shape and device
// is checked and each failure is a UserError naming the backend, the key, what was expected and
// what came. A backend declares its layout once and load() becomes a few lines:
//
//   const qtune::StateHeader h = qtune::check_state_meta(state, "int4", kFormatVersion);
//   const Json o = check_options(h.options, "int4 state meta.options");
//   auto t = qtune::check_state_tensors(state, "int4", {
//       {"weight", torch::kUInt8, {h.out, (h.in + 1) / 2}},
//       {"weight.scale", torch::kFloat32, {h.out, groups}}}, h.describe(o));
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "qtune/export.h"
#include "qtune/tensor_state.h"

namespace qtune {

/// What meta of every quantized-weight state holds: {"backend", "format_version", "shape": [out,
/// in], "options"}, read and checked by check_state_meta.
struct StateHeader {
  int64_t out = 0;
  int64_t in = 0;
  /// meta.options as stored (an object; resolve and check it with the backend's check_options).
  Json options = Json::object();
  /// "shape [out, in] and options {...}": the context for check_state_tensors' shape messages.
  std::string describe(const Json& resolved_options) const;
};

/// Checks meta: a JSON object whose "backend" is `backend`, whose "format_version" is
/// `format_version` (a mismatch says to re-quantize), whose "shape" is [out, in] with positive
/// integers (zero sizes too when `allow_empty`), and which has an "options" object. Throws
/// UserError "<backend> state: meta.<key> must be ..., got ...".
QTUNE_API StateHeader check_state_meta(const TensorState& state, const std::string& backend,
                                       int format_version, bool allow_empty = false);

/// Checks an integer meta key that is derived from the rest (a group count, say): when present
/// it must equal `expected`; `because` says where the expectation comes from.
QTUNE_API void check_state_meta_int(const TensorState& state, const std::string& backend,
                                    const std::string& key, int64_t expected,
                                    const std::string& because);

/// One tensor of a state layout: its key, dtype and exact shape.
struct TensorSpec {
  std::string key;
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
};

/// Checks that `state.tensors` holds exactly the tensors of `layout` (no key missing, none
/// unexpected), each defined, of its dtype and shape, all on one device. `context` completes
/// shape messages ("for shape [4, 9] and options {...}"). Returns the tensors by key, contiguous
/// and on their (common) device, sharing storage with the state where they already were.
QTUNE_API std::map<std::string, torch::Tensor> check_state_tensors(
    const TensorState& state, const std::string& backend, const std::vector<TensorSpec>& layout,
    const std::string& context);

}  // namespace qtune
