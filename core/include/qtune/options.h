// Option schemas: how a plugin declares its options (name, default, help) and how core checks the
// options a user gave against them before anything is allocated.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qtune/export.h"

namespace qtune {

using Json = nlohmann::json;

/// The kind of a JSON value as messages say it: "an integer", "a list", "a mapping", ...
QTUNE_API const char* json_type_name(const Json& v);

/// One option of a plugin. The default's JSON type is the option's type: a user value must have
/// the same type (an integer is accepted where a float is expected). The limits are optional and
/// declarative: resolve_options enforces them, `trainer --list-plugins` shows them, and the
/// conformance suite tests each boundary. Checks they cannot express (a power of two, a
/// combination of options) belong in QuantBackend::check_options.
struct OptionSpec {
  std::string name;
  Json default_value;
  std::string help;
  /// Smallest and largest allowed value of a numeric option, inclusive; null = unbounded.
  Json min = nullptr;
  Json max = nullptr;
  /// The allowed values (of the option's type); empty = any value of the type.
  std::vector<Json> choices = {};
};

/// Returns `user` completed with the schema's defaults. Throws UserError naming
/// `<context>.<key>` for an unknown key, a value of the wrong type, or a value outside the
/// declared min/max/choices; `user` may be null or an object. Other checks are the plugin's
/// (QuantBackend::check_options).
QTUNE_API Json resolve_options(const std::vector<OptionSpec>& schema, const Json& user,
                               const std::string& context);

/// One entry of an option-set list: a plugin name and the options given for it.
struct NamedOptions {
  std::string name;
  Json options = Json::object();
  /// Option keys in the order the user wrote them (Json objects are sorted by key).
  std::vector<std::string> key_order;
};

/// Parses "name:{json};name:{json};..." (the syntax of qtune-bench's and qtune_conformance's
/// --quant_sets; an entry without ":{...}" means the defaults). Throws UserError naming `flag`,
/// the entry and what was expected. Names are not looked up here.
QTUNE_API std::vector<NamedOptions> parse_option_sets(const std::string& text,
                                                      const std::string& flag);

/// The allowed values of `spec` in words: "an integer in [32, 4096]", "one of 2, 3, 4, 8".
QTUNE_API std::string describe_option_range(const OptionSpec& spec);

}  // namespace qtune
