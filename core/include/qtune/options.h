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
/// the same type (an integer is accepted where a float is expected).
struct OptionSpec {
  std::string name;
  Json default_value;
  std::string help;
};

/// Returns `user` completed with the schema's defaults. Throws UserError naming
/// `<context>.<key>` for an unknown key or a value of the wrong type; `user` may be null or an
/// object. Range checks are the plugin's job (it knows the meaning).
QTUNE_API Json resolve_options(const std::vector<OptionSpec>& schema, const Json& user,
                               const std::string& context);

}  // namespace qtune
