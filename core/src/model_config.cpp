// ModelConfig <-> Hugging Face config.json (llama, mistral, qwen2), validation and parameter count.
#include "qtune/model_config.h"

#include <algorithm>
#include <cmath>

#include "qtune/error.h"

namespace qtune {
namespace {

// Typed readers: a wrong JSON type is an error naming the file and the key.
int64_t get_int(const Json& j, const char* key, const std::string& origin) {
  const Json& v = j.at(key);
  QTUNE_CHECK(v.is_number_integer(), origin, ": \"", key, "\" must be an integer, got ", v.dump());
  return v.get<int64_t>();
}
double get_number(const Json& j, const char* key, const std::string& origin) {
  const Json& v = j.at(key);
  QTUNE_CHECK(v.is_number(), origin, ": \"", key, "\" must be a number, got ", v.dump());
  return v.get<double>();
}
bool get_bool(const Json& j, const char* key, const std::string& origin) {
  const Json& v = j.at(key);
  QTUNE_CHECK(v.is_boolean(), origin, ": \"", key, "\" must be true or false, got ", v.dump());
  return v.get<bool>();
}
int64_t required_int(const Json& j, const char* key, const std::string& origin) {
  QTUNE_CHECK(j.contains(key) && !j.at(key).is_null(), origin, ": missing required key \"", key,
              "\" (an integer)");
  return get_int(j, key, origin);
}
// bos/eos: an integer, null (no such token: -1), or a list (newer configs; the first is used).
int64_t token_id(const Json& j, const char* key, int64_t fallback, const std::string& origin) {
  if (!j.contains(key)) return fallback;
  const Json& v = j.at(key);
  if (v.is_null()) return -1;
  if (v.is_array()) {
    QTUNE_CHECK(!v.empty() && v[0].is_number_integer(), origin, ": \"", key,
                "\" must be an integer or a non-empty list of integers, got ", v.dump());
    return v[0].get<int64_t>();
  }
  return get_int(j, key, origin);
}

}  // namespace

namespace {

bool has_value(const Json& j, const char* key) { return j.contains(key) && !j.at(key).is_null(); }

std::string get_string(const Json& j, const char* key, const std::string& origin) {
  const Json& v = j.at(key);
  QTUNE_CHECK(v.is_string(), origin, ": \"", key, "\" must be a string, got ", v.dump());
  return v.get<std::string>();
}

// The families one decoder computes, with transformers' config defaults for absent keys
// (LlamaConfig, MistralConfig, Qwen2Config).
struct FamilyDefaults {
  const char* model_type;
  const char* architecture;
  int64_t max_position_embeddings;
  int64_t bos, eos;  // -1: none
};
constexpr FamilyDefaults kFamilies[] = {
    {"llama", "LlamaForCausalLM", 2048, 1, 2},
    {"mistral", "MistralForCausalLM", 4096 * 32, 1, 2},
    {"qwen2", "Qwen2ForCausalLM", 32768, -1, -1},
};

const FamilyDefaults& family(const std::string& model_type, const std::string& origin) {
  for (const auto& f : kFamilies)
    if (model_type == f.model_type) return f;
  throw UserError(origin + ": model_type \"" + model_type +
                  "\" is not supported (expected \"llama\", \"mistral\" or \"qwen2\")");
}

// rope_scaling (or transformers 5's rope_parameters, which also carries rope_theta). Every key
// must be one this rope type uses: an ignored one would change the numbers silently.
RopeScaling parse_rope(const Json& r, const std::string& key, const std::string& origin,
                       double* theta) {
  QTUNE_CHECK(r.is_object(), origin, ": \"", key, "\" must be an object or null, got ", r.dump());
  const std::string where = origin + ": " + key;
  RopeScaling s;
  if (r.contains("rope_type"))
    s.type = get_string(r, "rope_type", where);
  else if (r.contains("type"))
    s.type = get_string(r, "type", where);
  std::vector<std::string> allowed{"rope_type", "type", "rope_theta", "partial_rotary_factor"};
  if (s.type == "linear") {
    allowed.push_back("factor");
  } else if (s.type == "dynamic") {
    // transformers' dynamic NTK scales against max_position_embeddings; an
    // original_max_position_embeddings here does not enter its formula, nor ours.
    allowed.insert(allowed.end(), {"factor", "original_max_position_embeddings"});
  } else if (s.type == "llama3") {
    allowed.insert(allowed.end(), {"factor", "low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings"});
  } else {
    QTUNE_CHECK(s.type == "default", where, ".rope_type \"", s.type,
                "\" is not supported (expected default, linear, dynamic or llama3)");
  }
  for (const auto& [k, v] : r.items()) {
    if (std::find(allowed.begin(), allowed.end(), k) != allowed.end()) continue;
    std::string list;
    for (size_t i = 4; i < allowed.size(); ++i) list += (list.empty() ? "" : ", ") + allowed[i];
    throw UserError(where + "." + k + " = " + v.dump() + " is not supported for rope_type \"" +
                    s.type + "\" (expected " + (list.empty() ? "no parameters" : list) + ")");
  }
  if (r.contains("partial_rotary_factor"))
    QTUNE_CHECK(r["partial_rotary_factor"] == 1.0, where,
                ".partial_rotary_factor = ", r["partial_rotary_factor"].dump(),
                " is not supported (expected 1)");
  if (r.contains("rope_theta")) *theta = get_number(r, "rope_theta", where);
  auto need_number = [&](const char* k) {
    QTUNE_CHECK(has_value(r, k), where, ": rope_type \"", s.type, "\" needs \"", k, "\"");
    return get_number(r, k, where);
  };
  if (s.type != "default") s.factor = need_number("factor");
  if (s.type == "llama3") {
    s.low_freq_factor = need_number("low_freq_factor");
    s.high_freq_factor = need_number("high_freq_factor");
    QTUNE_CHECK(has_value(r, "original_max_position_embeddings"), where,
                ": rope_type \"llama3\" needs \"original_max_position_embeddings\"");
    s.original_max_position_embeddings = get_int(r, "original_max_position_embeddings", where);
  }
  return s;
}

}  // namespace

int64_t ModelConfig::attention_window(int64_t layer) const {
  if (sliding_window <= 0) return 0;
  if (sliding_layers.empty()) return sliding_window;
  return layer >= 0 && layer < static_cast<int64_t>(sliding_layers.size()) && sliding_layers[layer]
             ? sliding_window
             : 0;
}

bool ModelConfig::has_bias(const std::string& n) const {
  if (n == "q" || n == "k" || n == "v") return qkv_bias;
  if (n == "o") return o_bias;
  if (n == "gate" || n == "up" || n == "down") return mlp_bias;
  return false;
}

namespace {
// ModelConfig::validate's upper limits (see there).
constexpr int64_t kMaxHiddenSize = int64_t{1} << 17;
constexpr int64_t kMaxIntermediateSize = int64_t{1} << 20;
constexpr int64_t kMaxLayers = 4096;
constexpr int64_t kMaxHeads = int64_t{1} << 12;
constexpr int64_t kMaxHeadDim = int64_t{1} << 14;
constexpr int64_t kMaxVocab = int64_t{1} << 24;
constexpr int64_t kMaxPositions = int64_t{1} << 30;
// Upper limits far above any real model (the largest have hidden 16384-25600, 256k vocab) that
// keep every size product a loader forms (rows x columns x layers x bytes) inside int64_t, and
// turn a corrupt or hostile config into an error before anything is allocated from it.
void check_size_limits(const ModelConfig& c, const std::string& origin) {
  auto at_most = [&](const char* key, int64_t value, int64_t limit) {
    QTUNE_CHECK(value <= limit, origin, ": ", key, " = ", value, " is above the limit ", limit);
  };
  at_most("hidden_size", c.hidden_size, kMaxHiddenSize);
  at_most("intermediate_size", c.intermediate_size, kMaxIntermediateSize);
  at_most("num_hidden_layers", c.num_hidden_layers, kMaxLayers);
  at_most("num_attention_heads", c.num_attention_heads, kMaxHeads);
  at_most("num_key_value_heads", c.num_key_value_heads, kMaxHeads);
  at_most("head_dim", c.head_size, kMaxHeadDim);
  at_most("vocab_size", c.vocab_size, kMaxVocab);
  at_most("max_position_embeddings", c.max_position_embeddings, kMaxPositions);
}

}  // namespace

void ModelConfig::validate(const std::string& origin) const {
  family(model_type, origin);
  QTUNE_CHECK(hidden_size > 0, origin, ": hidden_size must be > 0, got ", hidden_size);
  QTUNE_CHECK(intermediate_size > 0, origin, ": intermediate_size must be > 0, got ",
              intermediate_size);
  QTUNE_CHECK(num_hidden_layers > 0, origin, ": num_hidden_layers must be > 0, got ",
              num_hidden_layers);
  QTUNE_CHECK(num_attention_heads > 0, origin, ": num_attention_heads must be > 0, got ",
              num_attention_heads);
  QTUNE_CHECK(num_key_value_heads > 0, origin, ": num_key_value_heads must be > 0, got ",
              num_key_value_heads);
  QTUNE_CHECK(head_size >= 0, origin, ": head_dim must be > 0, got ", head_size);
  check_size_limits(*this, origin);
  if (head_size == 0)
    QTUNE_CHECK(hidden_size % num_attention_heads == 0, origin, ": hidden_size (", hidden_size,
                ") must be divisible by num_attention_heads (", num_attention_heads,
                ") when head_dim is not given");
  QTUNE_CHECK(num_attention_heads % num_key_value_heads == 0, origin, ": num_attention_heads (",
              num_attention_heads, ") must be divisible by num_key_value_heads (",
              num_key_value_heads, ")");
  QTUNE_CHECK(head_dim() % 2 == 0, origin, ": head dimension ", head_dim(),
              " must be even for rotary embeddings");
  QTUNE_CHECK(vocab_size > 0, origin, ": vocab_size must be > 0, got ", vocab_size);
  QTUNE_CHECK(max_position_embeddings > 0, origin, ": max_position_embeddings must be > 0, got ",
              max_position_embeddings);
  QTUNE_CHECK(rms_norm_eps > 0, origin, ": rms_norm_eps must be > 0, got ", rms_norm_eps);
  QTUNE_CHECK(rope_theta > 0, origin, ": rope_theta must be > 0, got ", rope_theta);
  const RopeScaling& r = rope_scaling;
  QTUNE_CHECK(
      r.type == "default" || r.type == "linear" || r.type == "dynamic" || r.type == "llama3",
      origin, ": rope_scaling type \"", r.type, "\" is not supported");
  if (r.type != "default")
    QTUNE_CHECK(r.factor > 0 && std::isfinite(r.factor), origin,
                ": rope_scaling.factor must be > 0, got ", r.factor);
  if (r.type == "llama3") {
    QTUNE_CHECK(r.low_freq_factor > 0 && r.high_freq_factor > r.low_freq_factor, origin,
                ": rope_scaling needs 0 < low_freq_factor < high_freq_factor, got ",
                r.low_freq_factor, " and ", r.high_freq_factor);
    QTUNE_CHECK(r.original_max_position_embeddings > 0, origin,
                ": rope_scaling.original_max_position_embeddings must be > 0, got ",
                r.original_max_position_embeddings);
  }
  QTUNE_CHECK(sliding_window >= 0, origin, ": sliding_window must be > 0 or null, got ",
              sliding_window);
  QTUNE_CHECK(
      sliding_layers.empty() || static_cast<int64_t>(sliding_layers.size()) == num_hidden_layers,
      origin, ": layer_types must have one entry per layer (", num_hidden_layers, "), got ",
      sliding_layers.size());
  QTUNE_CHECK(bos_token_id >= -1 && bos_token_id < vocab_size, origin, ": bos_token_id ",
              bos_token_id, " is outside the vocabulary [0, ", vocab_size, ")");
  QTUNE_CHECK(eos_token_id >= -1 && eos_token_id < vocab_size, origin, ": eos_token_id ",
              eos_token_id, " is outside the vocabulary [0, ", vocab_size, ")");
}

ModelConfig ModelConfig::from_hf_json(const Json& j, const std::string& origin) {
  QTUNE_CHECK(j.is_object(), origin, ": expected a JSON object, got ", j.type_name());
  ModelConfig c;
  if (j.contains("model_type")) c.model_type = get_string(j, "model_type", origin);
  const FamilyDefaults& fam = family(c.model_type, origin);
  const bool llama = c.model_type == "llama", mistral = c.model_type == "mistral",
             qwen2 = c.model_type == "qwen2";

  c.hidden_size = required_int(j, "hidden_size", origin);
  c.intermediate_size = required_int(j, "intermediate_size", origin);
  c.num_hidden_layers = required_int(j, "num_hidden_layers", origin);
  c.num_attention_heads = required_int(j, "num_attention_heads", origin);
  c.vocab_size = required_int(j, "vocab_size", origin);
  // Defaults below are transformers' (LlamaConfig / MistralConfig / Qwen2Config) for absent keys.
  c.num_key_value_heads = has_value(j, "num_key_value_heads")
                              ? get_int(j, "num_key_value_heads", origin)
                              : c.num_attention_heads;
  c.max_position_embeddings = j.contains("max_position_embeddings")
                                  ? get_int(j, "max_position_embeddings", origin)
                                  : fam.max_position_embeddings;
  c.rms_norm_eps = j.contains("rms_norm_eps") ? get_number(j, "rms_norm_eps", origin) : 1e-6;
  c.rope_theta = j.contains("rope_theta") ? get_number(j, "rope_theta", origin) : 10000.0;
  c.tie_word_embeddings =
      j.contains("tie_word_embeddings") ? get_bool(j, "tie_word_embeddings", origin) : false;
  c.bos_token_id = token_id(j, "bos_token_id", fam.bos, origin);
  c.eos_token_id = token_id(j, "eos_token_id", fam.eos, origin);
  if (has_value(j, "head_dim")) {
    c.head_size = get_int(j, "head_dim", origin);
    QTUNE_CHECK(c.head_size > 0, origin, ": \"head_dim\" must be > 0, got ", c.head_size);
  }
  // Now, not only in validate(): sliding_layers below is sized by num_hidden_layers.
  check_size_limits(c, origin);

  // Rotary scaling: transformers 5 writes rope_parameters (with rope_theta inside), older
  // versions rope_scaling beside rope_theta.
  if (has_value(j, "rope_parameters"))
    c.rope_scaling = parse_rope(j["rope_parameters"], "rope_parameters", origin, &c.rope_theta);
  else if (has_value(j, "rope_scaling"))
    c.rope_scaling = parse_rope(j["rope_scaling"], "rope_scaling", origin, &c.rope_theta);

  // Projection biases: Qwen2 always has them on q/k/v (its attention has no switch); Llama has
  // attention_bias (q/k/v/o) and mlp_bias.
  if (qwen2) c.qkv_bias = true;
  if (llama) {
    if (j.contains("attention_bias")) c.qkv_bias = c.o_bias = get_bool(j, "attention_bias", origin);
    if (j.contains("mlp_bias")) c.mlp_bias = get_bool(j, "mlp_bias", origin);
  }

  // Sliding-window attention. Mistral: on every layer, 4096 when the key is absent. Qwen2: only
  // with use_sliding_window, on the layers from max_window_layers on, or as layer_types says.
  if (mistral) {
    c.sliding_window = !j.contains("sliding_window")   ? 4096
                       : j["sliding_window"].is_null() ? 0
                                                       : get_int(j, "sliding_window", origin);
  } else if (qwen2) {
    const bool use = j.contains("use_sliding_window") && get_bool(j, "use_sliding_window", origin);
    if (use) {
      c.sliding_window = !j.contains("sliding_window")   ? 4096
                         : j["sliding_window"].is_null() ? 0
                                                         : get_int(j, "sliding_window", origin);
      const int64_t from =
          j.contains("max_window_layers") ? get_int(j, "max_window_layers", origin) : 28;
      c.sliding_layers.assign(c.num_hidden_layers > 0 ? c.num_hidden_layers : 0, false);
      for (int64_t i = std::max<int64_t>(from, 0); i < c.num_hidden_layers; ++i)
        c.sliding_layers[i] = true;
    }
  } else if (has_value(j, "sliding_window")) {
    throw UserError(origin + ": \"sliding_window\" = " + j["sliding_window"].dump() +
                    " is not supported for model_type \"llama\" (expected null)");
  }
  if (has_value(j, "layer_types")) {
    const Json& lt = j["layer_types"];
    QTUNE_CHECK(lt.is_array(), origin, ": \"layer_types\" must be a list, got ", lt.dump());
    std::vector<bool> sliding;
    for (const auto& t : lt) {
      QTUNE_CHECK(t == "full_attention" || t == "sliding_attention", origin, ": layer_types entry ",
                  t.dump(),
                  " is not supported (expected \"full_attention\" or \"sliding_attention\")");
      sliding.push_back(t == "sliding_attention");
    }
    QTUNE_CHECK(static_cast<int64_t>(sliding.size()) == c.num_hidden_layers, origin,
                ": layer_types must have one entry per layer (", c.num_hidden_layers, "), got ",
                sliding.size());
    const bool any = std::find(sliding.begin(), sliding.end(), true) != sliding.end();
    QTUNE_CHECK(!any || c.sliding_window > 0, origin,
                ": layer_types has sliding_attention layers but no sliding window is set",
                qwen2 ? " (use_sliding_window and sliding_window)" : " (sliding_window)");
    c.sliding_layers = any ? sliding : std::vector<bool>{};
    if (!any) c.sliding_window = 0;
  }

  // Features we do not implement must not be silently ignored: the model would load and
  // produce wrong numbers.
  if (j.contains("hidden_act"))
    QTUNE_CHECK(j["hidden_act"] == "silu", origin, ": \"hidden_act\" = ", j["hidden_act"].dump(),
                " is not supported (expected \"silu\")");
  if (has_value(j, "partial_rotary_factor"))
    QTUNE_CHECK(j["partial_rotary_factor"] == 1.0, origin,
                ": \"partial_rotary_factor\" = ", j["partial_rotary_factor"].dump(),
                " is not supported (expected 1)");
  if (has_value(j, "attention_dropout"))
    QTUNE_CHECK(j["attention_dropout"] == 0.0, origin,
                ": \"attention_dropout\" = ", j["attention_dropout"].dump(),
                " is not supported (expected 0)");
  c.validate(origin);
  return c;
}

Json ModelConfig::to_hf_json() const {
  const FamilyDefaults& fam = family(model_type, "model config");
  Json j;
  j["architectures"] = Json::array({fam.architecture});
  j["model_type"] = model_type;
  j["hidden_act"] = "silu";
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim();
  j["vocab_size"] = vocab_size;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  if (rope_scaling.type == "default") {
    j["rope_scaling"] = nullptr;
  } else {
    Json r = {{"rope_type", rope_scaling.type}, {"factor", rope_scaling.factor}};
    if (rope_scaling.type == "llama3") {
      r["low_freq_factor"] = rope_scaling.low_freq_factor;
      r["high_freq_factor"] = rope_scaling.high_freq_factor;
      r["original_max_position_embeddings"] = rope_scaling.original_max_position_embeddings;
    }
    j["rope_scaling"] = r;
  }
  if (model_type == "llama") {
    // One switch covers q/k/v/o in transformers' Llama; other combinations have no config.
    QTUNE_CHECK(qkv_bias == o_bias,
                "model config: a llama model has biases on all of q/k/v/o "
                "(attention_bias) or on none");
    j["attention_bias"] = qkv_bias;
    j["mlp_bias"] = mlp_bias;
  } else {
    QTUNE_CHECK(qkv_bias == (model_type == "qwen2") && !o_bias && !mlp_bias,
                "model config: ", model_type,
                " fixes which projections have biases (q/k/v for qwen2, none for "
                "mistral)");
  }
  const bool layered = sliding_window > 0 && !sliding_layers.empty();
  if (model_type == "mistral") {
    QTUNE_CHECK(!layered, "model config: mistral's sliding window applies to every layer");
    j["sliding_window"] = sliding_window > 0 ? Json(sliding_window) : Json(nullptr);
  } else if (model_type == "qwen2") {
    j["use_sliding_window"] = sliding_window > 0;
    j["sliding_window"] = sliding_window > 0 ? Json(sliding_window) : Json(nullptr);
    int64_t first = num_hidden_layers;
    Json types = Json::array();
    for (int64_t i = 0; i < num_hidden_layers; ++i) {
      const bool s = attention_window(i) > 0;
      if (s && first == num_hidden_layers) first = i;
      types.push_back(s ? "sliding_attention" : "full_attention");
    }
    j["max_window_layers"] = first;
    j["layer_types"] = types;
  } else {
    QTUNE_CHECK(sliding_window == 0, "model config: llama has no sliding window");
  }
  j["attention_dropout"] = 0.0;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["bos_token_id"] = bos_token_id >= 0 ? Json(bos_token_id) : Json(nullptr);
  j["eos_token_id"] = eos_token_id >= 0 ? Json(eos_token_id) : Json(nullptr);
  j["initializer_range"] = 0.02;
  j["use_cache"] = true;
  return j;
}

int64_t ModelConfig::num_parameters() const {
  const int64_t h = hidden_size, q = num_attention_heads * head_dim(),
                kv = num_key_value_heads * head_dim(), m = intermediate_size;
  const int64_t per_layer = q * h + 2 * kv * h  // q_proj, k_proj, v_proj
                            + h * q             // o_proj
                            + 3 * h * m         // gate, up, down
                            + 2 * h             // two RMSNorm weights
                            + (qkv_bias ? q + 2 * kv : 0) + (o_bias ? h : 0) +
                            (mlp_bias ? 2 * m + h : 0);
  return vocab_size * h                       // embed_tokens
         + num_hidden_layers * per_layer + h  // final norm
         + (tie_word_embeddings ? 0 : vocab_size * h);
}

}  // namespace qtune
