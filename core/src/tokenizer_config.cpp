// tokenizer_config.json (transformers' PreTrainedTokenizer settings) beside a tokenizer file:
// read for BOS/EOS/pad, add_bos/add_eos and the chat template; written by save_hf_tokenizer().
#include <filesystem>

#include "qtune/atomic_file.h"
#include "qtune/error.h"
#include "qtune/files.h"
#include "qtune/options.h"
#include "tokenizer_internal.h"

namespace fs = std::filesystem;

namespace qtune {
namespace tok {

namespace {

// A special-token entry is a string, null, or an AddedToken object {"content": ..., ...}
// ({"__type": "AddedToken", ...} in older files).
std::string token_text(const Json& j, const std::string& key, const std::string& path) {
  if (!j.contains(key) || j[key].is_null()) return "";
  const Json& v = j[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  throw UserError(path + ": \"" + key +
                  "\" must be a string, null or an AddedToken object with a \"content\" string, "
                  "got " + v.dump().substr(0, 80));
}

bool flag(const Json& j, const std::string& key, bool fallback, const std::string& path) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  QTUNE_CHECK(j[key].is_boolean(), path, ": \"", key, "\" must be true or false, got ",
              j[key].dump().substr(0, 80));
  return j[key].get<bool>();
}

// A string, or (transformers >= 4.34) a list of {"name", "template"}: the one named "default".
std::string chat_template(const Json& j, const std::string& path) {
  if (!j.contains("chat_template") || j["chat_template"].is_null()) return "";
  const Json& v = j["chat_template"];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_array()) {
    for (const Json& t : v) {
      QTUNE_CHECK(t.is_object() && t.contains("name") && t["name"].is_string() &&
                      t.contains("template") && t["template"].is_string(),
                  path, ": each entry of \"chat_template\" must be {\"name\": string, "
                  "\"template\": string}, got ", t.dump().substr(0, 80));
      if (t["name"] == "default") return t["template"].get<std::string>();
    }
    throw UserError(path + ": \"chat_template\" is a list without an entry named \"default\"");
  }
  throw UserError(path + ": \"chat_template\" must be a string or a list of named templates, got " +
                  v.dump().substr(0, 80));
}

}  // namespace

ConfigFile read_tokenizer_config(const std::string& tokenizer_path) {
  ConfigFile f;
  TokenizerConfig& c = f.config;
  const fs::path p = fs::path(tokenizer_path).parent_path() / "tokenizer_config.json";
  std::error_code ec;
  if (!fs::is_regular_file(p, ec)) return f;
  c.path = p.string();
  const Json j = read_json_file(c.path);
  QTUNE_CHECK(j.is_object(), c.path, ": expected a JSON object, got ", j.type_name());
  c.bos_token = token_text(j, "bos_token", c.path);
  c.eos_token = token_text(j, "eos_token", c.path);
  c.pad_token = token_text(j, "pad_token", c.path);
  c.unk_token = token_text(j, "unk_token", c.path);
  c.add_bos_token = flag(j, "add_bos_token", c.add_bos_token, c.path);
  c.add_eos_token = flag(j, "add_eos_token", c.add_eos_token, c.path);
  c.chat_template = chat_template(j, c.path);
  // Which keys were present matters to the loaders (a null bos_token means "no BOS").
  f.has_bos_token = j.contains("bos_token");
  f.has_eos_token = j.contains("eos_token");
  f.has_pad_token = j.contains("pad_token");
  f.has_add_bos_token = j.contains("add_bos_token") && !j["add_bos_token"].is_null();
  f.has_add_eos_token = j.contains("add_eos_token") && !j["add_eos_token"].is_null();
  return f;
}

}  // namespace tok

void save_hf_tokenizer(const Tokenizer& tokenizer, const std::string& dir) {
  const std::string json = tokenizer.to_hf_json();
  const TokenizerConfig& c = tokenizer.config();
  Json cfg = c.path.empty() ? Json::object() : read_json_file(c.path);
  cfg["tokenizer_class"] = "PreTrainedTokenizerFast";  // the one class that reads tokenizer.json
  cfg["add_bos_token"] = c.add_bos_token;
  cfg["add_eos_token"] = c.add_eos_token;
  if (!cfg.contains("clean_up_tokenization_spaces")) cfg["clean_up_tokenization_spaces"] = false;
  auto put = [&](const char* key, const std::string& v) {
    cfg[key] = v.empty() ? Json(nullptr) : Json(v);
  };
  put("bos_token", c.bos_token);
  put("eos_token", c.eos_token);
  if (!c.pad_token.empty()) put("pad_token", c.pad_token);
  if (!c.unk_token.empty()) put("unk_token", c.unk_token);
  if (!c.chat_template.empty()) cfg["chat_template"] = c.chat_template;
  std::error_code ec;
  fs::create_directories(dir, ec);
  atomic_write_string((fs::path(dir) / "tokenizer.json").string(), json);
  atomic_write_string((fs::path(dir) / "tokenizer_config.json").string(), cfg.dump(2) + "\n");
}

void save_tokenizer_files(const std::string& tokenizer_path, const std::string& dir) {
  auto tokenizer = load_tokenizer(tokenizer_path);  // also checks that it is one
  const std::string ext = fs::path(tokenizer_path).extension().string();
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ext == ".model" || ext == ".bin") {
    const fs::path out = fs::path(dir) / (ext == ".model" ? "tokenizer.model" : "tokenizer.bin");
    if (!fs::exists(out, ec) || !fs::equivalent(tokenizer_path, out, ec))
      atomic_write_string(out.string(), read_text_file(tokenizer_path));
  }
  save_hf_tokenizer(*tokenizer, dir);
}

}  // namespace qtune
