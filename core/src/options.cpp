// Option checking against a plugin's schema, and the "name:{json};..." option-set lists.
#include "qtune/options.h"

#include <algorithm>
#include <cctype>

#include "qtune/error.h"

namespace qtune {

const char* json_type_name(const Json& v) {
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "a list";
  if (v.is_object()) return "a mapping";
  return "null";
}

namespace {

bool same_type(const Json& expected, const Json& got) {
  if (expected.is_number_float()) return got.is_number();  // 1 is a fine 1.0
  if (expected.is_number_integer()) return got.is_number_integer();
  if (expected.is_null()) return true;  // no default: any type, the plugin checks
  return expected.type() == got.type();
}

bool in_range(const OptionSpec& spec, const Json& v) {
  if (!spec.choices.empty() &&
      std::find(spec.choices.begin(), spec.choices.end(), v) == spec.choices.end())
    return false;
  if (v.is_number()) {
    const double d = v.get<double>();
    if (spec.min.is_number() && d < spec.min.get<double>()) return false;
    if (spec.max.is_number() && d > spec.max.get<double>()) return false;
  }
  return true;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

}  // namespace

std::string describe_option_range(const OptionSpec& spec) {
  if (!spec.choices.empty()) {
    std::string out = "one of ";
    for (size_t i = 0; i < spec.choices.size(); ++i)
      out += (i ? ", " : "") + spec.choices[i].dump();
    return out;
  }
  std::string out = json_type_name(spec.default_value);
  if (spec.min.is_number() && spec.max.is_number())
    out += " in [" + spec.min.dump() + ", " + spec.max.dump() + "]";
  else if (spec.min.is_number())
    out += " >= " + spec.min.dump();
  else if (spec.max.is_number())
    out += " <= " + spec.max.dump();
  return out;
}

Json resolve_options(const std::vector<OptionSpec>& schema, const Json& user,
                     const std::string& context) {
  QTUNE_CHECK(user.is_null() || user.is_object(), context, " must be a mapping of options, got ",
              user.dump());
  Json out = Json::object();
  for (const auto& spec : schema) out[spec.name] = spec.default_value;
  if (user.is_null()) return out;
  for (const auto& [key, value] : user.items()) {
    const OptionSpec* spec = nullptr;
    for (const auto& s : schema)
      if (s.name == key) spec = &s;
    if (spec == nullptr) {
      std::string known;
      for (const auto& s : schema) known += (known.empty() ? "" : ", ") + s.name;
      throw UserError(detail::concat("unknown option ", context, ".", key, " (known: ",
                                     known.empty() ? "none" : known, ")"));
    }
    QTUNE_CHECK(same_type(spec->default_value, value), context, ".", key, " must be ",
                json_type_name(spec->default_value), ", got ", value.dump());
    QTUNE_CHECK(in_range(*spec, value), context, ".", key, " must be ",
                describe_option_range(*spec), ", got ", value.dump());
    out[key] = spec->default_value.is_number_float() ? Json(value.get<double>()) : value;
  }
  return out;
}

std::vector<NamedOptions> parse_option_sets(const std::string& text, const std::string& flag) {
  // Split on ';' outside JSON strings and braces.
  std::vector<std::string> entries;
  std::string cur;
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      ++depth;
    } else if (c == '}' || c == ']') {
      --depth;
    } else if (c == ';' && depth == 0) {
      entries.push_back(cur);
      cur.clear();
      continue;
    }
    cur += c;
  }
  entries.push_back(cur);

  std::vector<NamedOptions> sets;
  for (const auto& raw : entries) {
    const std::string e = trim(raw);
    if (e.empty()) continue;
    NamedOptions s;
    const auto colon = e.find(':');
    s.name = trim(e.substr(0, colon));
    QTUNE_CHECK(
        !s.name.empty() && std::all_of(s.name.begin(), s.name.end(),
                                       [](char c) {
                                         return std::isalnum(static_cast<unsigned char>(c)) ||
                                                c == '_' || c == '-';
                                       }),
        flag, ": entry '", e, "' must start with a backend name (letters, digits, _ or -)",
        ", as in 'nf4:{\"double_quant\":false}'");
    if (colon != std::string::npos) {
      const std::string body = trim(e.substr(colon + 1));
      nlohmann::ordered_json parsed;
      try {
        parsed = nlohmann::ordered_json::parse(body.empty() ? "{}" : body);
      } catch (const std::exception& ex) {
        throw UserError(flag + ": entry '" + e + "': the options are not valid JSON (" + ex.what() +
                        ")");
      }
      QTUNE_CHECK(parsed.is_object(), flag, ": entry '", e,
                  "': the options must be a JSON object like {\"nbits\":4}, got ", body);
      for (const auto& [k, v] : parsed.items()) {
        s.key_order.push_back(k);
        s.options[k] = Json::parse(v.dump());
      }
    }
    sets.push_back(std::move(s));
  }
  QTUNE_CHECK(!sets.empty(), flag, ": no option set given, expected 'name:{json};name:{json}'");
  return sets;
}

}  // namespace qtune
