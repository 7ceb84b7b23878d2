// ModelConfig <-> Hugging Face LlamaConfig (config.json), validation and parameter count.
#include "qtune/model_config.h"

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

void ModelConfig::validate(const std::string& origin) const {
  QTUNE_CHECK(hidden_size > 0, origin, ": hidden_size must be > 0, got ", hidden_size);
  QTUNE_CHECK(intermediate_size > 0, origin, ": intermediate_size must be > 0, got ",
              intermediate_size);
  QTUNE_CHECK(num_hidden_layers > 0, origin, ": num_hidden_layers must be > 0, got ",
              num_hidden_layers);
  QTUNE_CHECK(num_attention_heads > 0, origin, ": num_attention_heads must be > 0, got ",
              num_attention_heads);
  QTUNE_CHECK(num_key_value_heads > 0, origin, ": num_key_value_heads must be > 0, got ",
              num_key_value_heads);
  QTUNE_CHECK(hidden_size % num_attention_heads == 0, origin, ": hidden_size (", hidden_size,
              ") must be divisible by num_attention_heads (", num_attention_heads, ")");
  QTUNE_CHECK(num_attention_heads % num_key_value_heads == 0, origin, ": num_attention_heads (",
              num_attention_heads, ") must be divisible by num_key_value_heads (",
              num_key_value_heads, ")");
  QTUNE_CHECK(head_dim() % 2 == 0, origin,
              ": head dimension hidden_size/num_attention_heads = ", head_dim(),
              " must be even for rotary embeddings");
  QTUNE_CHECK(vocab_size > 0, origin, ": vocab_size must be > 0, got ", vocab_size);
  QTUNE_CHECK(max_position_embeddings > 0, origin, ": max_position_embeddings must be > 0, got ",
              max_position_embeddings);
  QTUNE_CHECK(rms_norm_eps > 0, origin, ": rms_norm_eps must be > 0, got ", rms_norm_eps);
  QTUNE_CHECK(rope_theta > 0, origin, ": rope_theta must be > 0, got ", rope_theta);
  QTUNE_CHECK(bos_token_id >= -1 && bos_token_id < vocab_size, origin, ": bos_token_id ",
              bos_token_id, " is outside the vocabulary [0, ", vocab_size, ")");
  QTUNE_CHECK(eos_token_id >= -1 && eos_token_id < vocab_size, origin, ": eos_token_id ",
              eos_token_id, " is outside the vocabulary [0, ", vocab_size, ")");
}

ModelConfig ModelConfig::from_hf_json(const Json& j, const std::string& origin) {
  QTUNE_CHECK(j.is_object(), origin, ": expected a JSON object, got ", j.type_name());
  // Llama and Mistral share tensor names and math; Mistral differs only by sliding-window
  // attention, which is the same as full attention while the window covers the context.
  std::string model_type = "llama";
  if (j.contains("model_type")) {
    QTUNE_CHECK(j["model_type"].is_string(), origin, ": \"model_type\" must be a string, got ",
                j["model_type"].dump());
    model_type = j["model_type"].get<std::string>();
  }
  QTUNE_CHECK(model_type == "llama" || model_type == "mistral", origin, ": model_type \"",
              model_type,
              "\" is not supported (expected \"llama\" or a llama-compatible "
              "\"mistral\")");

  ModelConfig c;
  c.hidden_size = required_int(j, "hidden_size", origin);
  c.intermediate_size = required_int(j, "intermediate_size", origin);
  c.num_hidden_layers = required_int(j, "num_hidden_layers", origin);
  c.num_attention_heads = required_int(j, "num_attention_heads", origin);
  c.vocab_size = required_int(j, "vocab_size", origin);
  // Defaults below are transformers' LlamaConfig defaults, used when a key is absent.
  c.num_key_value_heads = (j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null())
                              ? get_int(j, "num_key_value_heads", origin)
                              : c.num_attention_heads;
  c.max_position_embeddings =
      j.contains("max_position_embeddings") ? get_int(j, "max_position_embeddings", origin) : 2048;
  c.rms_norm_eps = j.contains("rms_norm_eps") ? get_number(j, "rms_norm_eps", origin) : 1e-6;
  c.rope_theta = j.contains("rope_theta") ? get_number(j, "rope_theta", origin) : 10000.0;
  // transformers >= 5 writes RoPE as "rope_parameters": {"rope_type", "rope_theta", ...} and no
  // top-level rope_theta (found by the transformers oracle, tests/oracle/test_model.py).
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) {
    const Json& rp = j["rope_parameters"];
    QTUNE_CHECK(rp.is_object(), origin, ": \"rope_parameters\" must be an object, got ", rp.dump());
    if (rp.contains("rope_type"))
      QTUNE_CHECK(rp["rope_type"] == "default", origin,
                  ": \"rope_parameters\".rope_type = ", rp["rope_type"].dump(),
                  " is not supported (expected \"default\")");
    if (rp.contains("rope_theta"))
      c.rope_theta = get_number(rp, "rope_theta", origin + ": rope_parameters");
  }
  c.tie_word_embeddings =
      j.contains("tie_word_embeddings") ? get_bool(j, "tie_word_embeddings", origin) : false;
  c.bos_token_id = token_id(j, "bos_token_id", 1, origin);
  c.eos_token_id = token_id(j, "eos_token_id", 2, origin);

  // Features we do not implement must not be silently ignored: the model would load and
  // produce wrong numbers.
  if (j.contains("rope_scaling"))
    QTUNE_CHECK(j["rope_scaling"].is_null(), origin,
                ": \"rope_scaling\" = ", j["rope_scaling"].dump(),
                " is not supported (expected null)");
  if (j.contains("hidden_act"))
    QTUNE_CHECK(j["hidden_act"] == "silu", origin, ": \"hidden_act\" = ", j["hidden_act"].dump(),
                " is not supported (expected \"silu\")");
  for (const char* key : {"attention_bias", "mlp_bias"})
    if (j.contains(key))
      QTUNE_CHECK(j[key] == false, origin, ": \"", key, "\" = ", j[key].dump(),
                  " is not supported (expected false)");
  if (j.contains("head_dim") && !j["head_dim"].is_null() && c.num_attention_heads > 0) {
    int64_t hd = get_int(j, "head_dim", origin);
    QTUNE_CHECK(hd == c.hidden_size / c.num_attention_heads, origin, ": \"head_dim\" = ", hd,
                " is not supported (expected hidden_size / num_attention_heads = ",
                c.hidden_size / c.num_attention_heads, ")");
  }
  if (model_type == "mistral" && j.contains("sliding_window") && !j["sliding_window"].is_null()) {
    int64_t w = get_int(j, "sliding_window", origin);
    QTUNE_CHECK(w >= c.max_position_embeddings, origin, ": \"sliding_window\" = ", w,
                " is not supported (sliding-window attention; expected null or >= "
                "max_position_embeddings = ",
                c.max_position_embeddings, ")");
  }
  c.validate(origin);
  return c;
}

Json ModelConfig::to_hf_json() const {
  Json j;
  j["architectures"] = Json::array({"LlamaForCausalLM"});
  j["model_type"] = "llama";
  j["hidden_act"] = "silu";
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["vocab_size"] = vocab_size;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  j["rope_scaling"] = nullptr;
  j["attention_bias"] = false;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["bos_token_id"] = bos_token_id >= 0 ? Json(bos_token_id) : Json(nullptr);
  j["eos_token_id"] = eos_token_id >= 0 ? Json(eos_token_id) : Json(nullptr);
  j["initializer_range"] = 0.02;
  j["use_cache"] = true;
  return j;
}

int64_t ModelConfig::num_parameters() const {
  const int64_t h = hidden_size, kv = num_key_value_heads * head_dim();
  const int64_t per_layer = h * h                        // q_proj
                            + 2 * kv * h                 // k_proj, v_proj
                            + h * h                      // o_proj
                            + 3 * h * intermediate_size  // gate, up, down
                            + 2 * h;                     // two RMSNorm weights
  return vocab_size * h                                  // embed_tokens
         + num_hidden_layers * per_layer + h             // final norm
         + (tie_word_embeddings ? 0 : vocab_size * h);
}

}  // namespace qtune
