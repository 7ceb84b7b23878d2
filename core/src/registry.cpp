// Plugin discovery with Boost.DLL. The info record is read and checked before the factory is
// touched; libraries are kept loaded for the life of the process.
#include "qtune/registry.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>

#include <boost/dll/runtime_symbol_info.hpp>
#include <boost/dll/shared_library.hpp>
#include <spdlog/spdlog.h>

#include "qtune/error.h"
#include "qtune/plugin.h"

namespace fs = std::filesystem;

namespace qtune {

struct Registry::Impl {
  std::mutex mu;
  std::map<std::string, std::pair<std::shared_ptr<QuantBackend>, PluginRecord>> quant;
  std::map<std::string, std::pair<std::shared_ptr<AdapterFactory>, PluginRecord>> adapter;
  std::vector<std::string> errors;
  // Never unloaded: kept here until exit, and deliberately leaked by global().
  std::vector<boost::dll::shared_library> libraries;

  // A Registry of its own (tests) must not unload either: the body runs before the members are
  // destroyed, so the factories above are released while their code is still mapped, and the
  // handles are leaked so anything a plugin made may outlive the registry.
  ~Impl() { new std::vector<boost::dll::shared_library>(std::move(libraries)); }
};

Registry::Registry() : impl_(std::make_shared<Impl>()) {}

Registry& Registry::global() {
  static Registry* registry = new Registry();  // leaked on purpose: plugins outlive statics
  return *registry;
}

std::vector<std::string> Registry::default_dirs(const std::string& cli_dir) {
  std::vector<std::string> dirs;
  if (!cli_dir.empty()) dirs.push_back(cli_dir);
  if (const char* env = std::getenv("QTUNE_PLUGIN_PATH")) {
    std::string s = env;
    size_t start = 0;
    while (start <= s.size()) {
      size_t end = s.find(':', start);
      if (end == std::string::npos) end = s.size();
      if (end > start) dirs.push_back(s.substr(start, end - start));
      start = end + 1;
    }
  }
  std::error_code ec;
  fs::path exe_dir = boost::dll::program_location(ec).parent_path();
  if (!ec) dirs.push_back((exe_dir / QTUNE_PLUGIN_REL_DIR).lexically_normal().string());
  return dirs;
}

void Registry::scan(const std::vector<std::string>& dirs) {
  for (const auto& dir : dirs) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) {
      spdlog::debug("plugin dir {} does not exist; skipped", dir);
      continue;
    }
    std::vector<fs::path> files;
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      const auto name = entry.path().filename().string();
      if (entry.is_regular_file() && name.rfind("lib", 0) == 0 &&
          entry.path().extension() == ".so")
        files.push_back(entry.path());
    }
    std::sort(files.begin(), files.end());
    for (const auto& file : files) {
      try {
        load_library(file.string());
      } catch (const std::exception& e) {
        spdlog::warn("{}", e.what());
        std::lock_guard<std::mutex> lock(impl_->mu);
        impl_->errors.push_back(e.what());
      }
    }
  }
}

void Registry::load_library(const std::string& path) {
  boost::dll::shared_library lib;
  boost::dll::fs::error_code ec;
  lib.load(path, boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local, ec);
  if (ec) {
    const char* why = ::dlerror();  // Boost.DLL keeps only a generic error code
    throw UserError(detail::concat("plugin ", path, ": cannot be loaded: ",
                                   why ? why : ec.message()));
  }
  QTUNE_CHECK(lib.has("qtune_plugin_info"), "plugin ", path,
              ": not a qtune plugin (no qtune_plugin_info symbol)");
  const PluginInfo* info = lib.get_alias<const PluginInfo*()>("qtune_plugin_info")();
  QTUNE_CHECK(info != nullptr, "plugin ", path, ": qtune_plugin_info returned null");
  QTUNE_CHECK(info->abi_version == kPluginAbiVersion, "plugin ", path, " (built for plugin ABI version ",
              info->abi_version, ") refused: this qtune core has plugin ABI version ",
              kPluginAbiVersion, "; rebuild the plugin against this SDK");
  const std::string kind = info->kind ? info->kind : "";
  const std::string name = info->name ? info->name : "";
  QTUNE_CHECK(kind == "quant" || kind == "adapter", "plugin ", path, ": unknown kind '", kind,
              "' (expected quant or adapter)");
  QTUNE_CHECK(!name.empty(), "plugin ", path, ": empty name in its info record");
  QTUNE_CHECK(std::string(info->torch_version ? info->torch_version : "") == TORCH_VERSION,
              "plugin ", path, " (", name, ") refused: built against LibTorch ",
              info->torch_version ? info->torch_version : "?", ", this qtune core uses LibTorch ",
              TORCH_VERSION);
  QTUNE_CHECK(std::string(info->cxx_abi ? info->cxx_abi : "") == cxx_abi_tag(), "plugin ", path,
              " (", name, ") refused: built with C++ ABI ", info->cxx_abi ? info->cxx_abi : "?",
              ", this qtune core uses ", cxx_abi_tag());
  PluginRecord record{kind, name, info->version ? info->version : "", path};

  std::lock_guard<std::mutex> lock(impl_->mu);
  if ((kind == "quant" && impl_->quant.count(name)) ||
      (kind == "adapter" && impl_->adapter.count(name))) {
    spdlog::debug("plugin {} ({}) shadowed by an earlier one of the same name", path, name);
    return;
  }
  try {
    if (kind == "quant") {
      std::shared_ptr<QuantBackend> backend(lib.get_alias<QuantFactoryFn>("qtune_plugin_factory")());
      QTUNE_CHECK(backend, "plugin ", path, " (", name, "): factory returned null");
      impl_->quant[name] = {backend, record};
    } else {
      std::shared_ptr<AdapterFactory> factory(
          lib.get_alias<AdapterFactoryFn>("qtune_plugin_factory")());
      QTUNE_CHECK(factory, "plugin ", path, " (", name, "): factory returned null");
      impl_->adapter[name] = {factory, record};
    }
  } catch (const UserError&) {
    throw;
  } catch (const std::exception& e) {
    throw UserError(detail::concat("plugin ", path, " (", name, "): factory failed: ", e.what()));
  }
  impl_->libraries.push_back(std::move(lib));
  spdlog::debug("loaded {} plugin {} {} from {}", kind, name, record.version, path);
}

std::shared_ptr<QuantBackend> Registry::quant(const std::string& name) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->quant.find(name);
  if (it != impl_->quant.end()) return it->second.first;
  std::string known;
  for (const auto& [n, _] : impl_->quant) known += (known.empty() ? "" : ", ") + n;
  throw UserError(detail::concat("unknown quantization plugin '", name,
                                 "' (available: ", known.empty() ? "none found" : known,
                                 "; see --list-plugins and --plugin_dir)"));
}

std::shared_ptr<AdapterFactory> Registry::adapter(const std::string& name) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->adapter.find(name);
  if (it != impl_->adapter.end()) return it->second.first;
  std::string known;
  for (const auto& [n, _] : impl_->adapter) known += (known.empty() ? "" : ", ") + n;
  throw UserError(detail::concat("unknown adapter plugin '", name,
                                 "' (available: ", known.empty() ? "none found" : known,
                                 "; see --list-plugins and --plugin_dir)"));
}

std::vector<PluginRecord> Registry::plugins() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<PluginRecord> out;
  for (const auto& [_, v] : impl_->quant) out.push_back(v.second);
  for (const auto& [_, v] : impl_->adapter) out.push_back(v.second);
  return out;
}

std::vector<std::string> Registry::errors() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->errors;
}

void Registry::add_quant(std::shared_ptr<QuantBackend> backend, const std::string& path) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  const auto name = backend->name();
  impl_->quant[name] = {std::move(backend), PluginRecord{"quant", name, "builtin", path}};
}

void Registry::add_adapter(std::shared_ptr<AdapterFactory> factory, const std::string& path) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  const auto name = factory->name();
  impl_->adapter[name] = {std::move(factory), PluginRecord{"adapter", name, "builtin", path}};
}

}  // namespace qtune
