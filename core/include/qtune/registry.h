// The plugin registry: finds plugin libraries at run time, checks their info record, and hands
// out their factories by name. Libraries are never unloaded (autograd nodes and vtables live in
// plugin code and may outlive any one use).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "qtune/adapter.h"
#include "qtune/export.h"
#include "qtune/quantized_weight.h"

namespace qtune {

/// One plugin that loaded.
struct PluginRecord {
  std::string kind;  // "quant" or "adapter"
  std::string name;
  std::string version;
  std::string path;  // the library file
};

class QTUNE_API Registry {
 public:
  /// The process-wide registry, empty until scan() is called.
  static Registry& global();
  /// An empty registry (tests use their own).
  Registry();

  /// The search order: `cli_dir` (if not empty), each entry of QTUNE_PLUGIN_PATH (':'-separated),
  /// then <dir of the running executable>/../lib/qtune/plugins.
  static std::vector<std::string> default_dirs(const std::string& cli_dir);

  /// Loads every lib*.so in `dirs`, in order; a name found twice keeps the first. A library that
  /// fails (cannot be opened, no info record, wrong ABI/LibTorch version, factory throws) is
  /// recorded in errors() and the others still load. A missing directory is skipped, except
  /// a `cli_dir` given explicitly (callers check that themselves).
  void scan(const std::vector<std::string>& dirs);
  /// Loads one library; throws UserError with the reason (the same text errors() would hold).
  void load_library(const std::string& path);

  /// Throws UserError listing the available names when `name` is unknown.
  std::shared_ptr<QuantBackend> quant(const std::string& name) const;
  std::shared_ptr<AdapterFactory> adapter(const std::string& name) const;

  std::vector<PluginRecord> plugins() const;
  /// One message per library that failed to load, each naming the file.
  std::vector<std::string> errors() const;
  /// One message per library not used because a plugin of the same kind and name was found
  /// earlier in the search order, naming both files (also logged as a warning when scanning).
  std::vector<std::string> shadowed() const;

  /// Adds a backend directly (tests, statically linked builds).
  void add_quant(std::shared_ptr<QuantBackend> backend, const std::string& path = "<builtin>");
  void add_adapter(std::shared_ptr<AdapterFactory> factory, const std::string& path = "<builtin>");

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

/// What `--list-plugins` prints: a header and one line per plugin (kind, name, version, path),
/// each followed by its options ("name = default", the allowed values, the help), then a
/// "shadowed" line per shadowed library and a "failed" line per library that did not load.
QTUNE_API std::string plugin_listing(const Registry& registry);

}  // namespace qtune
