// State validation for QuantBackend::load() against a declared layout.
#include "qtune/state_layout.h"

#include "qtune/error.h"
#include "qtune/plugin_kit.h"

namespace qtune {
namespace {

std::string field(const Json& m, const char* key) {
  return m.is_object() && m.contains(key) ? m[key].dump() : std::string("nothing");
}

std::string key_list(const std::vector<TensorSpec>& layout) {
  std::string out;
  for (const auto& t : layout) out += (out.empty() ? "" : ", ") + t.key;
  return out;
}

}  // namespace

std::string StateHeader::describe(const Json& resolved_options) const {
  return detail::concat("for shape [", out, ", ", in, "] and options ", resolved_options.dump());
}

StateHeader check_state_meta(const TensorState& state, const std::string& backend,
                             int format_version, bool allow_empty) {
  const Json& m = state.meta;
  const std::string who = backend + " state";
  QTUNE_CHECK(m.is_object(), who, ": meta must be a JSON object, got ", m.dump());
  QTUNE_CHECK(m.value("backend", Json()) == backend, who, ": meta.backend must be \"", backend,
              "\", got ", field(m, "backend"));
  QTUNE_CHECK(m.value("format_version", Json()) == format_version, who,
              ": meta.format_version must be ", format_version, ", got ",
              field(m, "format_version"), " (re-quantize the model with this plugin)");
  const Json shape = m.value("shape", Json());
  const int64_t lo = allow_empty ? 0 : 1;
  QTUNE_CHECK(shape.is_array() && shape.size() == 2 && shape[0].is_number_integer() &&
                  shape[1].is_number_integer() && shape[0].get<int64_t>() >= lo &&
                  shape[1].get<int64_t>() >= lo,
              who, ": meta.shape must be [out, in] with ",
              allow_empty ? "non-negative" : "positive", " integers, got ", shape.dump());
  QTUNE_CHECK(m.contains("options") && m["options"].is_object(), who,
              ": meta.options must be a JSON object, got ", field(m, "options"));
  StateHeader h;
  h.out = shape[0].get<int64_t>();
  h.in = shape[1].get<int64_t>();
  h.options = m["options"];
  return h;
}

void check_state_meta_int(const TensorState& state, const std::string& backend,
                          const std::string& key, int64_t expected, const std::string& because) {
  const Json& m = state.meta;
  if (!m.is_object() || !m.contains(key)) return;
  QTUNE_CHECK(m[key] == expected, backend, " state: meta.", key, " is ", m[key].dump(), " but ",
              because, " gives ", expected);
}

std::map<std::string, torch::Tensor> check_state_tensors(const TensorState& state,
                                                         const std::string& backend,
                                                         const std::vector<TensorSpec>& layout,
                                                         const std::string& context) {
  const std::string who = backend + " state";
  for (const auto& [key, _] : state.tensors) {
    bool known = false;
    for (const auto& spec : layout) known |= spec.key == key;
    QTUNE_CHECK(known, who, ": unexpected tensor \"", key, "\" (expected ", key_list(layout), ")");
  }
  std::map<std::string, torch::Tensor> out;
  const torch::Tensor* first = nullptr;
  for (const auto& spec : layout) {
    auto it = state.tensors.find(spec.key);
    QTUNE_CHECK(it != state.tensors.end() && it->second.defined(), who, ": tensor \"", spec.key,
                "\" is missing (expected ", key_list(layout), ")");
    const torch::Tensor& t = it->second;
    QTUNE_CHECK(t.scalar_type() == spec.dtype, who, ": tensor \"", spec.key, "\" must be ",
                c10::toString(spec.dtype), ", got ", c10::toString(t.scalar_type()));
    QTUNE_CHECK(t.sizes() == torch::IntArrayRef(spec.shape), who, ": tensor \"", spec.key,
                "\" must have shape ", shape_str(spec.shape), " ", context, ", got ",
                shape_str(t.sizes()));
    if (first == nullptr) first = &t;
    QTUNE_CHECK(t.device() == first->device(), who, ": tensor \"", spec.key, "\" is on ",
                t.device().str(), " but \"", layout.front().key, "\" on ", first->device().str(),
                "; all must be on one device");
    out[spec.key] = t.contiguous();
  }
  return out;
}

}  // namespace qtune
