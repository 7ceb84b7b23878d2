// The training recipe. Every key is declared once (recipe.cpp: name, default, type, trainer
// flag, check, documentation); from that one list come the defaults, the checked merge of YAML
// files, flags and `key.path=value` overrides (unknown keys and wrong types are errors naming the
// key), the typed `Recipe` the trainer reads, the trainer's flags and the key table of
// docs/cli.md. Everything is checked before anything is allocated.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qtune/export.h"
#include "qtune/options.h"

namespace qtune {

// ---------------------------------------------------------------------------------------------
// The typed recipe

struct QTUNE_API ModelRecipe {
  std::string path;       ///< llama2.c .bin, HF directory or qtune-quantize directory
  std::string tokenizer;  ///< empty = the one beside the model
};
struct QTUNE_API QuantRecipe {
  std::string name;
  bool skip_output = false;
  std::vector<std::string> skip_modules;
  Json options = Json::object();  ///< checked by the backend's schema
};
struct QTUNE_API AdapterRecipe {
  std::string name;
  std::vector<std::string> target_modules;
  Json options = Json::object();  ///< checked by the adapter's schema
};
struct QTUNE_API DataRecipe {
  std::string path, format, val_path;
  double val_fraction = 0;
  int64_t seq_len = 0;
  // Chat and instruction records (data.h's DataConfig says what each does).
  std::string chat_template, messages_field, role_field, content_field, overlong;
  std::vector<std::string> role_system, role_user, role_assistant;
  bool train_on_prompt = false;
  bool pack = false;
};
struct QTUNE_API TrainRecipe {
  int64_t max_steps = 0, batch_size = 0, grad_accum = 0, warmup_steps = 0;
  double lr = 0, weight_decay = 0, beta1 = 0, beta2 = 0, eps = 0, min_lr_ratio = 0,
         max_grad_norm = 0;
  bool activation_checkpointing = false;
};
struct QTUNE_API EvalRecipe {
  int64_t every = 0, max_batches = 0;
};
struct QTUNE_API DistRecipe {  ///< checked further by dist_config_from_recipe (process_group.h)
  std::string backend, master_addr;
  double timeout_s = 0, bucket_mb = 0;
  int64_t master_port = 0;
  bool shard_base = false, shard_optimizer = false;
};
struct QTUNE_API CheckpointRecipe {
  int64_t every = 0, keep = 0;
};

/// A complete, checked recipe.
struct QTUNE_API Recipe {
  ModelRecipe model;
  std::string train_type, dtype;
  QuantRecipe quant;
  AdapterRecipe adapter;
  DataRecipe data;
  TrainRecipe train;
  EvalRecipe eval;
  CheckpointRecipe checkpoint;
  DistRecipe dist;
  int64_t log_every = 0, threads = 0;
  uint64_t seed = 0;
  std::string output_dir, plugin_dir, resume;
  bool overwrite = false;

  /// Reads and checks a complete recipe tree (as merge_recipe builds it): ranges and
  /// consistency, each error naming the key and the value.
  static Recipe from_json(const Json& tree);
  /// The tree again (what output_dir/recipe.json holds and --print-config prints).
  Json to_json() const;
};

// ---------------------------------------------------------------------------------------------
// The key list

/// One recipe key, as declared.
struct QTUNE_API RecipeKey {
  std::string path;     ///< "train.lr"
  Json default_value;   ///< also fixes the type
  std::string flag;     ///< trainer flag ("lr" for --lr), empty when none
  std::string doc;      ///< one line for docs/cli.md and --help
  std::string type() const;  ///< "integer", "number", "string", "boolean", "list", "mapping"
};

/// Every recipe key, in declaration order.
QTUNE_API const std::vector<RecipeKey>& recipe_keys();

/// The markdown table of every key (key, type, default, flag, meaning): what docs/cli.md shows
/// between its `<!-- recipe-keys -->` markers (a test compares them).
QTUNE_API std::string recipe_keys_markdown();

/// Every recipe key with its default value (the schema). Mappings named "options" are free-form
/// here: the selected plugin's schema checks them.
QTUNE_API Json recipe_defaults();

// ---------------------------------------------------------------------------------------------
// Building the tree

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
/// Range and consistency checks (max_steps > 0, 0 < val_fraction < 1, ...), naming the key:
/// Recipe::from_json without keeping the result.
QTUNE_API void validate_recipe(const Json& recipe);

/// Resolves a data/model path from a recipe: absolute or existing relative to the working
/// directory as given; otherwise looked up in $QTUNE_DATA, then ../shared/data beside the
/// working directory and beside the source tree. Throws UserError naming `key`, the path and
/// every place tried.
QTUNE_API std::string resolve_data_path(const std::string& path, const std::string& key);

}  // namespace qtune
