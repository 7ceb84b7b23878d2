// The recipe keys, YAML loading, checked merging and the typed recipe (see recipe.h).
#include "qtune/recipe.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <sstream>
#include <thread>
#include <type_traits>

#include <boost/dll/runtime_symbol_info.hpp>
#include <yaml-cpp/depthguard.h>
#include <yaml-cpp/yaml.h>

#include "qtune/chat_template.h"
#include "qtune/error.h"
#include "qtune/process_group.h"
#include "qtune/process_group.h"

namespace fs = std::filesystem;

namespace qtune {

// ---------------------------------------------------------------------------------------------
// The key list: every recipe key once, with its default, trainer flag, meaning and check

namespace {

// A check returns what is wrong with a value ("must be > 0"), or nothing.
template <typename T>
using Check = std::function<std::string(const T&)>;

template <typename T>
std::string show(const T& v) {
  std::ostringstream os;
  os << v;
  return os.str();
}
template <typename T>
Check<T> above(T lo) {
  return [lo](const T& v) { return v > lo ? std::string() : "must be > " + show(lo); };
}
template <typename T>
Check<T> at_least(T lo, const std::string& note = "") {
  return [lo, note](const T& v) { return v >= lo ? std::string() : "must be >= " + show(lo) + note; };
}
// [lo, hi], or [lo, hi) when `open_top`.
Check<double> within(double lo, double hi, bool open_top = false) {
  return [lo, hi, open_top](const double& v) {
    const bool ok = v >= lo && (open_top ? v < hi : v <= hi);
    return ok ? std::string()
              : "must be in [" + show(lo) + ", " + show(hi) + (open_top ? ")" : "]");
  };
}
Check<std::string> one_of(std::vector<std::string> allowed) {
  return [allowed](const std::string& v) {
    if (std::find(allowed.begin(), allowed.end(), v) != allowed.end()) return std::string();
    std::string list;
    for (size_t i = 0; i < allowed.size(); ++i)
      list += (i == 0 ? "" : i + 1 == allowed.size() ? " or " : ", ") + allowed[i];
    return "must be " + list;
  };
}
// A built-in chat template's name, or "auto".
Check<std::string> chat_template_name() {
  return [](const std::string& v) {
    if (v != "auto") ChatTemplate::builtin(v, "data.template");  // throws naming the built-ins
    return std::string();
  };
}
// 0 (= all cores) up to the cores of this machine: more only oversubscribes them.
Check<int64_t> thread_count() {
  return [](const int64_t& v) {
    const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
    if (v < 0) return std::string("must be >= 0 (0 = all cores)");
    if (v > cores) return "must be at most " + show(cores) + ", the cores of this machine (0 = all)";
    return std::string();
  };
}
Check<std::string> not_empty() {
  return [](const std::string& v) { return v.empty() ? std::string("must not be empty") : ""; };
}

// The declaration. `v` is called once per key with (path, member, default, flag, doc[, check]);
// the visitors below turn that into the defaults, the typed recipe, the tree and the docs.
template <typename V>
void declare_keys(V& v, Recipe& r) {
  // clang-format off
  v("model.path", r.model.path, "stories260K.bin", "model", "HF directory of model_type llama / mistral / qwen2 (config.json + safetensors, sharded or not; a `qtune-quantize` output; a bitsandbytes 4-bit directory, qlora only) or llama2.c `.bin` (also looked up in the data folder)");
  v("model.tokenizer", r.model.tokenizer, "", "tokenizer", "any format of [formats.md](formats.md#tokenizers): `tokenizer.json`, GPT-2 `vocab.json` (+ `merges.txt`), `.model` (sentencepiece or tiktoken), `.tiktoken`, `tok*.bin` (llama2.c); empty = `tokenizer.model`, else `tokenizer.bin`, else `tokenizer.json` beside an HF model");
  v("train_type", r.train_type, "lora", "train_type", "`full`, `lora` or `qlora`", one_of({"full", "lora", "qlora"}));
  v("dtype", r.dtype, "fp32", "dtype", "compute dtype `fp32` or `bf16`; trainable weights are always fp32 masters", one_of({"fp32", "float32", "bf16", "bfloat16"}));
  v("quant.name", r.quant.name, "nf4", "quant", "quantization plugin (qlora only)");
  v("quant.skip_output", r.quant.skip_output, false, "", "keep the output head dense under qlora");
  v("quant.skip_modules", r.quant.skip_modules, std::vector<std::string>{}, "", "module patterns kept dense under qlora, like bitsandbytes' `llm_int8_skip_modules`: a name matches whole path components (`lm_head`, `down_proj`, `layers.0`), `*`/`?` glob the full path");
  v("quant.options", r.quant.options, Json::object(), "", "the plugin's options (`trainer --list-plugins`; docs per plugin)");
  v("adapter.name", r.adapter.name, "lora", "adapter", "adapter plugin (lora and qlora): `lora`, or `dora` (weight-decomposed LoRA; with qlora this is QDoRA)");
  v("adapter.target_modules", r.adapter.target_modules, std::vector<std::string>{"q", "k", "v", "o", "gate", "up", "down"}, "", "any of q, k, v, o, gate, up, down, output (HF names like `q_proj`, `lm_head` work too), or `all-linear`; a list, or one name");
  v("adapter.options", r.adapter.options, Json::object(), "", "lora and dora: `rank` 8, `alpha` 16.0, `dropout` 0.0, `use_rslora` false, `init` kaiming or gaussian (dora's magnitude starts at the base's row norms)");
  v("data.path", r.data.path, "tinyshakespeare.txt", "data", "training file (also looked up in the data folder)");
  v("data.format", r.data.format, "auto", "data_format", "`text`, `alpaca`, `messages`, `sharegpt` or `auto` (see [Data formats](#data-formats))", one_of({"auto", "text", "alpaca", "messages", "sharegpt"}));
  v("data.val_path", r.data.val_path, "", "val_data", "validation file; else `data.val_fraction` of the documents is held out");
  v("data.val_fraction", r.data.val_fraction, 0.05, "", "held-out fraction (documents chosen by seed)");
  v("data.seq_len", r.data.seq_len, int64_t{256}, "seq_len", "tokens per sequence", above<int64_t>(0));
  v("data.template", r.data.chat_template, "auto", "", "chat template: `llama2`, `llama3`, `chatml`, `qwen2`, `mistral`, `mistral_v1`, `zephyr`, `alpaca`, or `auto` = the model's own (see [Chat templates](#chat-templates))", chat_template_name());
  v("data.messages_field", r.data.messages_field, "", "", "key of a record's message list (`\"\"` = `messages`, for sharegpt `conversations`)");
  v("data.role_field", r.data.role_field, "", "", "key of a message's role (`\"\"` = `role`, for sharegpt `from`)");
  v("data.content_field", r.data.content_field, "", "", "key of a message's text (`\"\"` = `content`, for sharegpt `value`)");
  v("data.role_system", r.data.role_system, std::vector<std::string>{}, "", "the data set's names for the system role (`[]` = `system`)");
  v("data.role_user", r.data.role_user, std::vector<std::string>{}, "", "the data set's names for the user role (`[]` = messages: `user`; sharegpt: `human`, `user`)");
  v("data.role_assistant", r.data.role_assistant, std::vector<std::string>{}, "", "the data set's names for the assistant role (`[]` = messages: `assistant`; sharegpt: `gpt`, `assistant`)");
  v("data.train_on_prompt", r.data.train_on_prompt, false, "", "`false`: the loss counts the assistant's tokens (answers and their end of turn) only; `true`: every token but padding");
  v("data.overlong", r.data.overlong, "truncate", "", "a record longer than `data.seq_len + 1` tokens: `truncate` (keep the first `seq_len + 1`, drop the record if no target is left) or `drop`; both counted in the log", one_of({"truncate", "drop"}));
  v("data.pack", r.data.pack, false, "", "several records (or text documents) per sequence, each attending only to itself (see [Packing](#packing))");
  v("train.max_steps", r.train.max_steps, int64_t{300}, "max_steps", "optimizer steps", above<int64_t>(0));
  v("train.batch_size", r.train.batch_size, int64_t{16}, "batch_size", "sequences per micro-batch", above<int64_t>(0));
  v("train.grad_accum", r.train.grad_accum, int64_t{1}, "", "micro-batches per optimizer step", above<int64_t>(0));
  v("train.lr", r.train.lr, 0.003, "lr", "peak learning rate", above(0.0));
  v("train.weight_decay", r.train.weight_decay, 0.0, "", "AdamW decoupled weight decay", at_least(0.0));
  v("train.beta1", r.train.beta1, 0.9, "", "AdamW beta1", within(0, 1, true));
  v("train.beta2", r.train.beta2, 0.999, "", "AdamW beta2", within(0, 1, true));
  v("train.eps", r.train.eps, 1e-8, "", "AdamW epsilon", above(0.0));
  v("train.warmup_steps", r.train.warmup_steps, int64_t{20}, "", "linear warmup", at_least<int64_t>(0));
  v("train.min_lr_ratio", r.train.min_lr_ratio, 0.1, "", "cosine decays to `lr * min_lr_ratio` at `max_steps`", within(0, 1));
  v("train.max_grad_norm", r.train.max_grad_norm, 1.0, "", "gradient clipping (0 = off)", at_least(0.0, " (0 = no clipping)"));
  v("train.activation_checkpointing", r.train.activation_checkpointing, false, "", "recompute each decoder layer in backward");
  v("eval.every", r.eval.every, int64_t{50}, "eval_every", "evaluate every N steps (0 = only at the start and end)", at_least<int64_t>(0));
  v("eval.max_batches", r.eval.max_batches, int64_t{16}, "", "cap on validation batches per evaluation", above<int64_t>(0));
  v("checkpoint.every", r.checkpoint.every, int64_t{0}, "", "save a checkpoint every N steps (0 = only at the end and when stopped)", at_least<int64_t>(0));
  v("checkpoint.keep", r.checkpoint.keep, int64_t{2}, "", "checkpoints kept", at_least<int64_t>(1));
  v("dist.backend", r.dist.backend, "auto", "", "process-group backend: `gloo` (CPU), `nccl` (CUDA) or `auto` (see [distributed.md](distributed.md))", one_of({"auto", "gloo", "nccl"}));
  v("dist.timeout_s", r.dist.timeout_s, 600.0, "", "seconds a rank waits for the others (joining, every collective); a lost rank is named after at most this long");
  v("dist.master_addr", r.dist.master_addr, "", "", "rank 0's host when the launcher sets no `MASTER_ADDR` (SLURM)");
  v("dist.master_port", r.dist.master_port, int64_t{29500}, "", "rank 0's TCPStore port when the launcher sets no `MASTER_PORT`");
  v("dist.bucket_mb", r.dist.bucket_mb, 25.0, "", "gradient all-reduce bucket size in MiB");
  v("dist.shard_base", r.dist.shard_base, false, "", "qlora: each rank keeps 1/N of the quantized base and gathers each projection when it runs (FSDP-style; see [distributed.md](distributed.md))");
  v("dist.shard_optimizer", r.dist.shard_optimizer, false, "", "each rank keeps AdamW's moments for 1/N of the trainable parameters, steps those and sends them to the others (ZeRO stage 1; same results, checkpoints unchanged; see [distributed.md](distributed.md))");
  v("log_every", r.log_every, int64_t{10}, "", "log line interval when stderr is not a terminal", above<int64_t>(0));
  v("seed", r.seed, uint64_t{42}, "seed", "data split, shuffling, adapter init, dropout");
  v("threads", r.threads, int64_t{0}, "threads", "intra-op threads (0 = all cores; at most the cores)", thread_count());
  v("output_dir", r.output_dir, "runs/default", "output_dir", "metrics, summary, checkpoints, adapter / model", not_empty());
  v("plugin_dir", r.plugin_dir, "", "plugin_dir", "searched before `QTUNE_PLUGIN_PATH` and the install's plugin folder");
  v("resume", r.resume, "", "resume", "checkpoint directory or `latest`");
  v("overwrite", r.overwrite, false, "overwrite", "start anew in an `output_dir` that holds a run (its recipe, metrics, summary, checkpoints, adapter / model are removed first); without it such a directory is refused unless resuming (with `resume` it has no effect)");
  // clang-format on
}

// The node at a dotted path of a tree (created when absent).
Json& at_path(Json& tree, const std::string& path) {
  Json* node = &tree;
  size_t start = 0;
  while (true) {
    const size_t dot = path.find('.', start);
    node = &(*node)[path.substr(start, dot - start)];
    if (dot == std::string::npos) return *node;
    start = dot + 1;
  }
}

struct CollectKeys {
  std::vector<RecipeKey> keys;
  template <typename T, typename D, typename... C>
  void operator()(const char* path, T&, const D& def, const char* flag, const char* doc,
                  const C&...) {
    keys.push_back({path, Json(T(def)), flag, doc});
  }
};

struct ReadKeys {
  const Json& tree;
  template <typename T, typename D>
  void operator()(const char* path, T& member, const D&, const char*, const char*,
                  const Check<T>& check = {}) {
    const Json* node = &tree;
    std::string rest = path;
    for (size_t dot; (dot = rest.find('.')) != std::string::npos; rest = rest.substr(dot + 1))
      node = &node->at(rest.substr(0, dot));
    const Json& value = node->at(rest);
    if constexpr (std::is_same_v<T, std::vector<std::string>>) {
      for (const auto& m : value)
        QTUNE_CHECK(m.is_string(), path, " must be a list of names, got ", m.dump());
    }
    if constexpr (std::is_unsigned_v<T> && !std::is_same_v<T, bool>)
      QTUNE_CHECK(!value.is_number_integer() || value.is_number_unsigned() ||
                      value.get<int64_t>() >= 0,
                  path, " must be >= 0, got ", value.dump());
    member = value.get<T>();
    if (check) {
      const std::string err = check(member);
      QTUNE_CHECK(err.empty(), path, " ", err, ", got ", value.dump());
    }
  }
};

struct WriteKeys {
  Json tree = Json::object();
  template <typename T, typename D, typename... C>
  void operator()(const char* path, T& member, const D&, const char*, const char*, const C&...) {
    at_path(tree, path) = member;
  }
};

}  // namespace

std::string RecipeKey::type() const {
  if (default_value.is_boolean()) return "boolean";
  if (default_value.is_number_integer()) return "integer";
  if (default_value.is_number()) return "number";
  if (default_value.is_string()) return "string";
  if (default_value.is_array()) return "list";
  return "mapping";
}

const std::vector<RecipeKey>& recipe_keys() {
  static const std::vector<RecipeKey> keys = [] {
    CollectKeys c;
    Recipe r;
    declare_keys(c, r);
    return c.keys;
  }();
  return keys;
}

Json recipe_defaults() {
  Json tree = Json::object();
  for (const auto& k : recipe_keys()) at_path(tree, k.path) = k.default_value;
  return tree;
}

std::string recipe_keys_markdown() {
  std::string md = "| key | type | default | flag | meaning |\n| --- | --- | --- | --- | --- |\n";
  for (const auto& k : recipe_keys())
    md += "| `" + k.path + "` | " + k.type() + " | `" + k.default_value.dump() + "` | " +
          (k.flag.empty() ? "" : "`--" + k.flag + "`") + " | " + k.doc + " |\n";
  return md;
}

Recipe Recipe::from_json(const Json& tree) {
  Recipe r;
  ReadKeys read{tree};
  declare_keys(read, r);
  // Checks that involve more than one key.
  QTUNE_CHECK(!r.data.val_path.empty() || (r.data.val_fraction > 0 && r.data.val_fraction < 1),
              "data.val_fraction must be in (0, 1) when data.val_path is empty, got ",
              r.data.val_fraction);
  dist_config_from_recipe(tree);  // the dist.* ranges (process_group.h)
  return r;
}

Json Recipe::to_json() const {
  WriteKeys w;
  Recipe copy = *this;
  declare_keys(w, copy);
  return w.tree;
}

// ---------------------------------------------------------------------------------------------
// YAML -> JSON

namespace {

Json scalar_to_json(const YAML::Node& n) {
  const std::string s = n.Scalar();
  if (n.Tag() == "!") return s;  // quoted: always a string
  if (s == "~" || s == "null" || s == "Null" || s == "NULL" || s.empty()) return nullptr;
  if (s == "true" || s == "True" || s == "TRUE") return true;
  if (s == "false" || s == "False" || s == "FALSE") return false;
  try {
    size_t used = 0;
    long long v = std::stoll(s, &used, 10);
    if (used == s.size()) return v;
  } catch (...) {
  }
  try {
    size_t used = 0;
    double v = std::stod(s, &used);
    if (used == s.size()) return v;
  } catch (...) {
  }
  return s;
}

// A recipe is small: bounds on what a YAML document may expand to (aliases repeat whole subtrees,
// so a few lines can stand for billions of values) and on its nesting.
constexpr int64_t kMaxYamlValues = 100000;
constexpr int kMaxYamlDepth = 32;

struct YamlReader {
  std::string origin;  // the file, or the override's text
  int64_t values = 0;

  std::string where(const YAML::Node& n) const {
    const auto m = n.Mark();
    return m.line >= 0 ? detail::concat(origin, ":", m.line + 1) : origin;
  }

  Json convert(const YAML::Node& n, int depth) {
    QTUNE_CHECK(++values <= kMaxYamlValues, where(n), ": the YAML expands to more than ",
                kMaxYamlValues, " values (aliases repeating large anchors?); a recipe is far smaller");
    QTUNE_CHECK(depth <= kMaxYamlDepth, where(n), ": the YAML nests deeper than ", kMaxYamlDepth,
                " levels");
    switch (n.Type()) {
      case YAML::NodeType::Null:
      case YAML::NodeType::Undefined:
        return nullptr;
      case YAML::NodeType::Scalar:
        return scalar_to_json(n);
      case YAML::NodeType::Sequence: {
        Json a = Json::array();
        for (const auto& e : n) a.push_back(convert(e, depth + 1));
        return a;
      }
      case YAML::NodeType::Map: {
        Json o = Json::object();
        std::map<std::string, std::string> first;  // key -> where it was first given
        for (const auto& kv : n) {
          QTUNE_CHECK(kv.first.IsScalar(), where(kv.first), ": a mapping key must be a name");
          const std::string key = kv.first.Scalar();
          const auto [it, fresh] = first.emplace(key, where(kv.first));
          QTUNE_CHECK(fresh, where(kv.first), ": duplicate key '", key, "' (first given at ",
                      it->second, "); give each key once");
          o[key] = convert(kv.second, depth + 1);
        }
        return o;
      }
    }
    return nullptr;
  }
};

bool compatible(const Json& expected, const Json& got) {
  if (expected.is_number_float()) return got.is_number();
  if (expected.is_number_integer()) return got.is_number_integer();
  if (expected.is_array()) return got.is_array();
  return expected.type() == got.type();
}

void merge_checked(Json& dst, const Json& schema, const Json& src, const std::string& path,
                   const std::string& origin) {
  QTUNE_CHECK(src.is_object(), origin, ": ", path.empty() ? "the recipe" : path,
              " must be a mapping, got ", src.dump());
  for (const auto& [key, value] : src.items()) {
    const std::string full = path.empty() ? key : path + "." + key;
    if (!schema.contains(key)) {
      std::string known;
      for (const auto& [k, _] : schema.items()) known += (known.empty() ? "" : ", ") + k;
      throw UserError(origin + ": unknown key '" + full + "' (expected one of: " + known + ")");
    }
    const Json& expected = schema.at(key);
    if (key == "options") {  // free-form: the plugin's schema checks it later
      QTUNE_CHECK(value.is_object() || value.is_null(), origin, ": ", full,
                  " must be a mapping, got ", value.dump());
      dst[key] = value.is_null() ? Json::object() : value;
      continue;
    }
    if (expected.is_object()) {
      merge_checked(dst[key], expected, value, full, origin);
      continue;
    }
    if (expected.is_array() && value.is_string()) {  // one name where a list is expected
      dst[key] = Json::array({value});
      continue;
    }
    QTUNE_CHECK(compatible(expected, value), origin, ": ", full, " must be ", json_type_name(expected),
                ", got ", value.dump());
    dst[key] = expected.is_number_float() ? Json(value.get<double>()) : value;
  }
}

}  // namespace

// JSON strings are UTF-8, so a recipe value that is not is refused here, naming `origin`, rather
// than later by a message that prints it.
void check_utf8(const Json& j, const std::string& origin) {
  try {
    (void)j.dump();
  } catch (const Json::type_error& e) {
    throw UserError(origin + ": not valid UTF-8 text (" + e.what() + ")");
  }
}

Json load_yaml_file(const std::string& path) {
  QTUNE_CHECK(fs::exists(path), "config file not found: ", path);
  Json j;
  try {
    j = YamlReader{path}.convert(YAML::LoadFile(path), 0);
  } catch (const YAML::DeepRecursion& e) {
    throw UserError(detail::concat(path, ":", e.mark.line + 1, ": the YAML nests deeper than ",
                                   e.depth(), " levels"));
  } catch (const YAML::Exception& e) {
    throw UserError(detail::concat(path, ":", e.mark.line + 1, ": invalid YAML: ", e.msg));
  }
  check_utf8(j, path);
  if (j.is_null()) j = Json::object();
  QTUNE_CHECK(j.is_object(), path, ": the top level must be a mapping of recipe keys");
  return j;
}

Json parse_yaml_value(const std::string& text) {
  Json j;
  try {
    j = YamlReader{"value '" + text + "'"}.convert(YAML::Load(text), 0);
  } catch (const YAML::Exception& e) {
    throw UserError("cannot parse value '" + text + "': " + e.msg);
  }
  check_utf8(j, "value '" + text + "'");
  return j;
}

void merge_recipe(Json& recipe, const Json& overlay, const std::string& origin) {
  merge_checked(recipe, recipe_defaults(), overlay, "", origin);
}

void apply_override(Json& recipe, const std::string& assignment) {
  const auto eq = assignment.find('=');
  QTUNE_CHECK(eq != std::string::npos && eq > 0, "override '", assignment,
              "' must look like key.path=value");
  const std::string key = assignment.substr(0, eq);
  check_utf8(Json(key), "override '" + assignment + "': its key");
  Json value = parse_yaml_value(assignment.substr(eq + 1));
  // Build the nested overlay {"a": {"b": value}} and merge it with the usual checks.
  Json overlay = value;
  size_t end = key.size();
  while (true) {
    // A key starting with '.' leaves end = 0, and rfind('.', end - 1) would search the whole key
    // again (end - 1 wraps around): forever, nesting the overlay deeper each time.
    QTUNE_CHECK(end > 0, "override '", assignment, "' has an empty key part");
    const auto dot = key.rfind('.', end - 1);
    const std::string part = key.substr(dot == std::string::npos ? 0 : dot + 1,
                                        end - (dot == std::string::npos ? 0 : dot + 1));
    QTUNE_CHECK(!part.empty(), "override '", assignment, "' has an empty key part");
    overlay = Json{{part, overlay}};
    if (dot == std::string::npos) break;
    end = dot;
  }
  // An override inside options replaces one option rather than the whole mapping.
  if (key.find(".options.") != std::string::npos) {
    const auto pos = key.find(".options.");
    const std::string section = key.substr(0, pos);
    const std::string opt = key.substr(pos + 9);
    QTUNE_CHECK(recipe_defaults().contains(section), "override '", assignment,
                "': unknown key '", section, "'");
    recipe[section]["options"][opt] = value;
    return;
  }
  merge_recipe(recipe, overlay, "override '" + assignment + "'");
}

void validate_recipe(const Json& recipe) { Recipe::from_json(recipe); }

std::string resolve_data_path(const std::string& path, const std::string& key) {
  QTUNE_CHECK(!path.empty(), key, " is empty");
  if (fs::path(path).is_absolute() || fs::exists(path)) {
    QTUNE_CHECK(fs::exists(path), key, ": file not found: ", path);
    return path;
  }
  std::vector<fs::path> tried;
  if (const char* env = std::getenv("QTUNE_DATA"); env && *env) tried.push_back(fs::path(env) / path);
  tried.push_back(fs::path("../shared/data") / path);
  std::error_code ec;
  // The executable sits in <repo>/build/bin or <prefix>/bin: try the data beside the repo too.
  const fs::path exe = boost::dll::program_location(ec);
  if (!ec) tried.push_back(exe.parent_path() / "../../../shared/data" / path);
#ifdef QTUNE_SOURCE_DIR
  tried.push_back(fs::path(QTUNE_SOURCE_DIR) / "../shared/data" / path);
#endif
  for (const auto& p : tried)
    if (fs::exists(p)) return p.lexically_normal().string();
  std::string where;
  for (const auto& p : tried) where += (where.empty() ? "" : ", ") + p.lexically_normal().string();
  throw UserError(key + ": file not found: " + path + " (looked in the working directory, " +
                  where + "; set QTUNE_DATA to the data folder)");
}

}  // namespace qtune
