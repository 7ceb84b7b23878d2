// Run identity: fingerprints of a base model and of a training run (see run_identity.h).
#include "qtune/run_identity.h"

#include <filesystem>
#include <string>
#include <vector>

#include "qtune/error.h"
#include "qtune/model_files.h"
#include "qtune/safetensors.h"

namespace fs = std::filesystem;

namespace qtune {

namespace {

std::string dtype_name(torch::ScalarType t) {
  if (t == torch::kFloat32) return "fp32";
  if (t == torch::kBFloat16) return "bf16";
  if (t == torch::kFloat64) return "fp64";
  return c10::toString(t);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Identity

namespace {

// FNV-1a, 64 bit: a fingerprint against mistakes, not an adversary.
struct Fnv1a {
  uint64_t h = 1469598103934665603ull;
  void add(const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    for (size_t i = 0; i < n; ++i) {
      h ^= p[i];
      h *= 1099511628211ull;
    }
  }
  void add(const std::string& s) {
    add(s.data(), s.size());
    add("\0", 1);
  }
  std::string hex() const {
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
    return buf;
  }
};

// Rows of a tensor the fingerprint looks at: first, last and evenly spaced between.
constexpr int64_t kSampleRows = 16;

// Sampled rows of `name`, rounded to bf16: an fp32 model and its bf16 copy hash the same.
void hash_tensor(Fnv1a& h, const WeightSource& w, const std::string& name) {
  torch::Tensor t;
  if (const auto* st = dynamic_cast<const SafetensorsWeightSource*>(&w)) {
    t = st->view(name);  // zero-copy: only the sampled rows are touched
  } else {
    t = w.get(name, torch::kFloat32);
  }
  if (t.dim() >= 2 && t.size(0) > kSampleRows) {
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < kSampleRows; ++i)
      rows.push_back(i * (t.size(0) - 1) / (kSampleRows - 1));
    t = t.index_select(0, torch::tensor(rows, torch::kLong));
  }
  t = t.to(torch::kFloat32).to(torch::kBFloat16).contiguous();
  h.add(name);
  for (auto s : t.sizes()) h.add(&s, sizeof s);
  h.add(t.data_ptr(), static_cast<size_t>(t.numel() * t.element_size()));
}

// The config.json fields that decide the function a set of weights computes; those a family
// does not write (attention_bias outside llama, sliding_window without a window) are left out.
// Only the recorded fields are compared, so identities written before a field was added still
// match.
const std::vector<std::string>& architecture_fields() {
  static const std::vector<std::string> f{
      "model_type",          "hidden_size",         "intermediate_size",   "num_hidden_layers",
      "num_attention_heads", "num_key_value_heads", "head_dim",            "vocab_size",
      "rms_norm_eps",        "rope_theta",          "rope_scaling",        "tie_word_embeddings",
      "attention_bias",      "mlp_bias",            "sliding_window",      "layer_types"};
  return f;
}

}  // namespace

Json base_identity(const std::string& model_path, const ModelConfig& config,
                   const WeightSource& weights) {
  const Json hf = config.to_hf_json();
  Json arch = Json::object();
  for (const auto& k : architecture_fields())
    if (hf.contains(k)) arch[k] = hf.at(k);

  Fnv1a dense, linear;
  bool linear_ok = true;
  std::vector<std::string> dense_names{"model.embed_tokens.weight", "model.norm.weight"};
  std::vector<std::string> linear_names;
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    dense_names.push_back(p + "input_layernorm.weight");
    dense_names.push_back(p + "post_attention_layernorm.weight");
    for (const char* s : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})
      linear_names.push_back(p + s + ".weight");
  }
  if (!config.tie_word_embeddings) linear_names.push_back("lm_head.weight");
  for (const auto& n : dense_names) {
    QTUNE_CHECK(weights.has(n), weights.describe(), ": missing tensor ", n);
    hash_tensor(dense, weights, n);
  }
  for (const auto& n : linear_names) {
    if (!weights.has(n) || weights.has_quantized(n)) {
      // Stored only quantized (a qtune-quantize directory): its projections cannot be compared
      // with a dense model's, so the dense part alone identifies the base.
      linear_ok = false;
      break;
    }
    hash_tensor(linear, weights, n);
  }
  std::string path = model_path;
  std::error_code ec;
  if (auto abs = fs::absolute(model_path, ec); !ec) path = abs.lexically_normal().string();
  return Json{{"path", path},
              {"source", weights.describe()},
              {"config", arch},
              {"dense_hash", dense.hex()},
              {"linear_hash", linear_ok ? Json(linear.hex()) : Json(nullptr)}};
}

Json prequantized_options(const WeightSource& weights) {
  const std::string probe = "model.layers.0.self_attn.q_proj.weight";
  if (!weights.has_quantized(probe)) return nullptr;
  const TensorState st = weights.quantized(probe);
  return Json{{"backend", st.meta.value("backend", "")},
              {"options", st.meta.value("options", Json::object())}};
}

Json run_identity(const TuningSpec& spec, const Json& base) {
  const bool quantized = spec.quantized_base();
  const AdapterSpec& a = spec.adapter;
  Json targets = nullptr;
  if (a.present()) targets = std::vector<std::string>(a.target_modules.begin(), a.target_modules.end());
  return Json{
      {"train_type", spec.name()},
      {"dtype", dtype_name(spec.dtype)},
      {"quant", quantized ? Json(spec.base.quant->name()) : Json(nullptr)},
      {"quant_options", quantized ? spec.base.quant_options : Json(nullptr)},
      {"quant_skip_output", quantized ? Json(spec.base.quant_skip_output) : Json(nullptr)},
      {"quant_skip_modules", quantized && !spec.base.quant_skip_modules.empty()
                                 ? Json(spec.base.quant_skip_modules)
                                 : Json(nullptr)},
      {"adapter", a.present() ? Json(a.factory->name()) : Json(nullptr)},
      {"adapter_options", a.present() ? a.options : Json(nullptr)},
      {"target_modules", targets},
      {"base", base},
  };
}

void check_base_identity(const Json& recorded, const Json& current, const std::string& what) {
  QTUNE_CHECK(recorded.is_object() && current.is_object(), what,
              ": the base model identity is missing or malformed");
  const std::string rp = recorded.value("path", "?"), cp = current.value("path", "?");
  const Json& rc = recorded.at("config");
  const Json& cc = current.at("config");
  std::string was, is;  // every differing field, in both models
  for (const auto& [k, v] : rc.items()) {
    const Json other = cc.value(k, Json(nullptr));
    if (v == other) continue;
    was += (was.empty() ? "" : ", ") + k + " " + v.dump();
    is += (is.empty() ? "" : ", ") + k + " " + other.dump();
  }
  QTUNE_CHECK(was.empty(), what, ": it was trained on base model ", rp, " with ", was, ", but ",
              cp, " has ", is, " (pass the base model it was trained on with --model)");
  QTUNE_CHECK(recorded.value("dense_hash", "") == current.value("dense_hash", ""), what,
              ": it was trained on base model ", rp, " (weights fingerprint ",
              recorded.value("dense_hash", "?"), "), but ", cp,
              " has different embedding/norm weights (fingerprint ",
              current.value("dense_hash", "?"), "); pass the base model it was trained on");
  const Json rl = recorded.value("linear_hash", Json(nullptr));
  const Json cl = current.value("linear_hash", Json(nullptr));
  QTUNE_CHECK(rl.is_null() || cl.is_null() || rl == cl, what, ": it was trained on base model ", rp,
              " (projection fingerprint ", rl.dump(), "), but ", cp,
              " has different projection weights (fingerprint ", cl.dump(),
              "); pass the base model it was trained on");
}

void check_run_identity(const Json& recorded, const Json& current, const std::string& what) {
  QTUNE_CHECK(recorded.is_object(), what, ": the run identity is missing or malformed");
  for (const char* field : {"train_type", "quant", "quant_skip_output", "quant_skip_modules",
                            "quant_options", "adapter", "adapter_options", "target_modules"}) {
    const Json r = recorded.value(field, Json(nullptr));
    const Json c = current.value(field, Json(nullptr));
    if (r == c) continue;
    if (r.is_object() && c.is_object()) {
      // Name the option that differs, not the whole mapping.
      for (const auto& [k, v] : r.items())
        QTUNE_CHECK(c.contains(k) && c[k] == v, what, ": it was trained with ", field, ".", k, " ",
                    v.dump(), ", but this run has ",
                    c.contains(k) ? c[k].dump() : std::string("no such option"));
      for (const auto& [k, v] : c.items())
        QTUNE_CHECK(r.contains(k), what, ": this run has ", field, ".", k, " ", v.dump(),
                    ", which the checkpoint does not record");
    }
    throw UserError(what + ": it was trained with " + field + " " + r.dump() +
                    ", but this run has " + field + " " + c.dump());
  }
  check_base_identity(recorded.at("base"), current.at("base"), what);
}

}  // namespace qtune
