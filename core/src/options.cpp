// Option checking against a plugin's schema.
#include "qtune/options.h"

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

}  // namespace

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
    out[key] = spec->default_value.is_number_float() ? Json(value.get<double>()) : value;
  }
  return out;
}

}  // namespace qtune
