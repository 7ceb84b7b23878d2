// The training recipe: one JSON tree built from defaults, a YAML file, CLI flags and
// `key.path=value` overrides, checked against the defaults (unknown keys and wrong types are
// errors naming the key) before anything is allocated.
#pragma once

#include <string>
#include <vector>

#include "qtune/export.h"
#include "qtune/options.h"

namespace qtune {

/// Every recipe key with its default value (the schema). Mappings named "options" are free-form
/// here: the selected plugin's schema checks them.
QTUNE_API Json recipe_defaults();

/// Reads a YAML file into JSON (plain scalars become bool/int/float/null where they parse as
/// such; quoted scalars stay strings). Throws UserError naming the file and line on bad YAML.
QTUNE_API Json load_yaml_file(const std::string& path);
/// One YAML scalar or flow value ("3", "1e-4", "[q, v]", "true") as JSON.
QTUNE_API Json parse_yaml_value(const std::string& text);

/// Merges `overlay` into `recipe`, checking each key against recipe_defaults(): an unknown key or
/// a value of the wrong type throws UserError naming the full key path and `origin`.
QTUNE_API void merge_recipe(Json& recipe, const Json& overlay, const std::string& origin);
/// Applies "a.b.c=value" (value parsed by parse_yaml_value) with the same checks.
QTUNE_API void apply_override(Json& recipe, const std::string& assignment);
/// Range and consistency checks (max_steps > 0, 0 < val_fraction < 1, ...), naming the key.
QTUNE_API void validate_recipe(const Json& recipe);

/// Resolves a data/model path from a recipe: absolute or existing relative to the working
/// directory as given; otherwise looked up in $QTUNE_DATA, then ../shared/data beside the
/// working directory and beside the source tree. Throws UserError naming `key`, the path and
/// every place tried.
QTUNE_API std::string resolve_data_path(const std::string& path, const std::string& key);

}  // namespace qtune
