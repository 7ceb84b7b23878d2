// Recipe defaults, YAML loading and checked merging (see recipe.h).
#include "qtune/recipe.h"

#include <cstdlib>
#include <filesystem>

#include <boost/dll/runtime_symbol_info.hpp>
#include <yaml-cpp/yaml.h>

#include "qtune/error.h"
#include "qtune/process_group.h"

namespace fs = std::filesystem;

namespace qtune {

Json recipe_defaults() {
  return Json::parse(R"({
    "model": {"path": "stories260K.bin", "tokenizer": ""},
    "train_type": "lora",
    "dtype": "fp32",
    "quant": {"name": "nf4", "skip_output": false, "options": {}},
    "adapter": {"name": "lora", "target_modules": ["q", "k", "v", "o", "gate", "up", "down"],
                "options": {}},
    "data": {"path": "tinyshakespeare.txt", "format": "auto", "val_path": "",
             "val_fraction": 0.05, "seq_len": 256},
    "train": {"max_steps": 300, "batch_size": 16, "grad_accum": 1, "lr": 0.003,
              "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
              "warmup_steps": 20, "min_lr_ratio": 0.1, "max_grad_norm": 1.0,
              "activation_checkpointing": false},
    "eval": {"every": 50, "max_batches": 16},
    "checkpoint": {"every": 0, "keep": 2},
    "dist": {"backend": "auto", "timeout_s": 600.0, "master_addr": "", "master_port": 29500,
             "bucket_mb": 25.0},
    "log_every": 10,
    "seed": 42,
    "threads": 0,
    "output_dir": "runs/default",
    "plugin_dir": "",
    "resume": ""
  })");
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

Json node_to_json(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      return nullptr;
    case YAML::NodeType::Scalar:
      return scalar_to_json(n);
    case YAML::NodeType::Sequence: {
      Json a = Json::array();
      for (const auto& e : n) a.push_back(node_to_json(e));
      return a;
    }
    case YAML::NodeType::Map: {
      Json o = Json::object();
      for (const auto& kv : n) o[kv.first.as<std::string>()] = node_to_json(kv.second);
      return o;
    }
  }
  return nullptr;
}

const char* type_name(const Json& v) {
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "a list";
  if (v.is_object()) return "a mapping";
  return "null";
}

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
    QTUNE_CHECK(compatible(expected, value), origin, ": ", full, " must be ", type_name(expected),
                ", got ", value.dump());
    dst[key] = expected.is_number_float() ? Json(value.get<double>()) : value;
  }
}

}  // namespace

Json load_yaml_file(const std::string& path) {
  QTUNE_CHECK(fs::exists(path), "config file not found: ", path);
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::Exception& e) {
    throw UserError(detail::concat(path, ":", e.mark.line + 1, ": invalid YAML: ", e.msg));
  }
  Json j = node_to_json(root);
  if (j.is_null()) j = Json::object();
  QTUNE_CHECK(j.is_object(), path, ": the top level must be a mapping of recipe keys");
  return j;
}

Json parse_yaml_value(const std::string& text) {
  try {
    return node_to_json(YAML::Load(text));
  } catch (const YAML::Exception& e) {
    throw UserError("cannot parse value '" + text + "': " + e.msg);
  }
}

void merge_recipe(Json& recipe, const Json& overlay, const std::string& origin) {
  merge_checked(recipe, recipe_defaults(), overlay, "", origin);
}

void apply_override(Json& recipe, const std::string& assignment) {
  const auto eq = assignment.find('=');
  QTUNE_CHECK(eq != std::string::npos && eq > 0, "override '", assignment,
              "' must look like key.path=value");
  const std::string key = assignment.substr(0, eq);
  Json value = parse_yaml_value(assignment.substr(eq + 1));
  // Build the nested overlay {"a": {"b": value}} and merge it with the usual checks.
  Json overlay = value;
  size_t end = key.size();
  while (true) {
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

void validate_recipe(const Json& r) {
  auto positive = [&](const Json& v, const std::string& key) {
    QTUNE_CHECK(v.get<double>() > 0, key, " must be > 0, got ", v.dump());
  };
  const auto& t = r.at("train");
  positive(t.at("max_steps"), "train.max_steps");
  positive(t.at("batch_size"), "train.batch_size");
  positive(t.at("grad_accum"), "train.grad_accum");
  positive(t.at("lr"), "train.lr");
  positive(r.at("data").at("seq_len"), "data.seq_len");
  QTUNE_CHECK(t.at("warmup_steps").get<int64_t>() >= 0, "train.warmup_steps must be >= 0, got ",
              t.at("warmup_steps").dump());
  const double mlr = t.at("min_lr_ratio").get<double>();
  QTUNE_CHECK(mlr >= 0 && mlr <= 1, "train.min_lr_ratio must be in [0, 1], got ", mlr);
  QTUNE_CHECK(t.at("max_grad_norm").get<double>() >= 0,
              "train.max_grad_norm must be >= 0 (0 = no clipping), got ", t.at("max_grad_norm").dump());
  QTUNE_CHECK(t.at("weight_decay").get<double>() >= 0, "train.weight_decay must be >= 0, got ",
              t.at("weight_decay").dump());
  const double vf = r.at("data").at("val_fraction").get<double>();
  QTUNE_CHECK(!r.at("data").at("val_path").get<std::string>().empty() || (vf > 0 && vf < 1),
              "data.val_fraction must be in (0, 1) when data.val_path is empty, got ", vf);
  const auto fmt = r.at("data").at("format").get<std::string>();
  QTUNE_CHECK(fmt == "auto" || fmt == "text" || fmt == "alpaca",
              "data.format must be auto, text or alpaca, got '", fmt, "'");
  QTUNE_CHECK(r.at("eval").at("every").get<int64_t>() >= 0, "eval.every must be >= 0, got ",
              r.at("eval").at("every").dump());
  QTUNE_CHECK(r.at("eval").at("max_batches").get<int64_t>() > 0, "eval.max_batches must be > 0");
  QTUNE_CHECK(r.at("checkpoint").at("every").get<int64_t>() >= 0, "checkpoint.every must be >= 0");
  QTUNE_CHECK(r.at("checkpoint").at("keep").get<int64_t>() >= 1, "checkpoint.keep must be >= 1");
  QTUNE_CHECK(r.at("threads").get<int64_t>() >= 0, "threads must be >= 0 (0 = all cores)");
  QTUNE_CHECK(r.at("log_every").get<int64_t>() > 0, "log_every must be > 0");
  QTUNE_CHECK(!r.at("output_dir").get<std::string>().empty(), "output_dir must not be empty");
  for (const auto& m : r.at("adapter").at("target_modules"))
    QTUNE_CHECK(m.is_string(), "adapter.target_modules must be a list of names, got ", m.dump());
  dist_config_from_recipe(r);
}

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
