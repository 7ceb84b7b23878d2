// Plugin discovery with Boost.DLL. The info record is read and checked before the factory is
// touched; libraries are kept loaded for the life of the process.
#include "qtune/registry.h"

#include <dlfcn.h>
#include <elf.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/dll/runtime_symbol_info.hpp>
#include <boost/dll/shared_library.hpp>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <map>
#include <mutex>
#include <optional>

#include "qtune/error.h"
#include "qtune/plugin.h"
#include "qtune/plugin_stamp.h"

namespace fs = std::filesystem;

namespace qtune {

// Without a stamp (nullopt) the caller loads the library and relies on PluginInfo.
std::optional<PluginStamp> read_plugin_stamp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  auto read_at = [&](uint64_t offset, void* out, size_t n) {
    f.seekg(static_cast<std::streamoff>(offset));
    return static_cast<bool>(f.read(static_cast<char*>(out), static_cast<std::streamsize>(n)));
  };
  Elf64_Ehdr eh;
  if (!f || !read_at(0, &eh, sizeof eh) || std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 ||
      eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_ident[EI_DATA] != ELFDATA2LSB ||
      eh.e_shentsize != sizeof(Elf64_Shdr) || eh.e_shnum == 0 || eh.e_shstrndx >= eh.e_shnum)
    return std::nullopt;
  std::vector<Elf64_Shdr> sections(eh.e_shnum);
  if (!read_at(eh.e_shoff, sections.data(), sections.size() * sizeof(Elf64_Shdr)))
    return std::nullopt;
  const Elf64_Shdr& names = sections[eh.e_shstrndx];
  if (names.sh_size > (1u << 20)) return std::nullopt;
  std::string strtab(names.sh_size, '\0');
  if (!read_at(names.sh_offset, strtab.data(), strtab.size())) return std::nullopt;
  for (const Elf64_Shdr& sh : sections) {
    if (sh.sh_name >= strtab.size() ||
        std::strcmp(strtab.c_str() + sh.sh_name, QTUNE_PLUGIN_STAMP_SECTION) != 0)
      continue;
    PluginStamp stamp;
    if (sh.sh_type != SHT_PROGBITS || sh.sh_size < sizeof stamp ||
        !read_at(sh.sh_offset, &stamp, sizeof stamp))
      return std::nullopt;
    // Every string must be terminated inside its field, or the stamp is not ours.
    auto terminated = [](const char* s, size_t n) { return std::memchr(s, '\0', n) != nullptr; };
    if (std::strcmp(stamp.magic, QTUNE_PLUGIN_STAMP_MAGIC) != 0 ||
        !terminated(stamp.kind, sizeof stamp.kind) || !terminated(stamp.name, sizeof stamp.name) ||
        !terminated(stamp.version, sizeof stamp.version) ||
        !terminated(stamp.torch_version, sizeof stamp.torch_version) ||
        !terminated(stamp.cxx_abi, sizeof stamp.cxx_abi))
      return std::nullopt;
    return stamp;
  }
  return std::nullopt;
}

namespace {

// The compatibility checks, the same whether the facts come from the stamp (before loading) or
// from PluginInfo (after). Each refusal names both sides.
void check_compatible(const std::string& path, uint32_t abi_version, const std::string& kind,
                      const std::string& name, const std::string& torch_version,
                      const std::string& cxx_abi) {
  const std::string who = name.empty() ? path : path + " (" + name + ")";
  QTUNE_CHECK(abi_version == kPluginAbiVersion, "plugin ", who, " refused: built for plugin ABI ",
              "version ", abi_version, ", this qtune core has plugin ABI version ",
              kPluginAbiVersion, "; rebuild the plugin against this SDK");
  QTUNE_CHECK(kind == "quant" || kind == "adapter", "plugin ", who, ": unknown kind '", kind,
              "' (expected quant or adapter)");
  QTUNE_CHECK(!name.empty(), "plugin ", path, ": empty name in its info record");
  QTUNE_CHECK(torch_version == TORCH_VERSION, "plugin ", who, " refused: built against LibTorch ",
              torch_version.empty() ? "?" : torch_version, ", this qtune core uses LibTorch ",
              TORCH_VERSION, "; rebuild the plugin against LibTorch ", TORCH_VERSION);
  QTUNE_CHECK(cxx_abi == cxx_abi_tag(), "plugin ", who, " refused: built with C++ ABI ",
              cxx_abi.empty() ? "?" : cxx_abi, ", this qtune core uses ", cxx_abi_tag());
}

std::string or_empty(const char* s) { return s ? s : ""; }

}  // namespace

struct Registry::Impl {
  std::mutex mu;
  std::map<std::string, std::pair<std::shared_ptr<QuantBackend>, PluginRecord>> quant;
  std::map<std::string, std::pair<std::shared_ptr<AdapterFactory>, PluginRecord>> adapter;
  std::vector<std::string> errors;
  std::vector<std::string> shadowed;
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
      if (entry.is_regular_file() && name.rfind("lib", 0) == 0 && entry.path().extension() == ".so")
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
  // A stamped plugin built for another ABI, LibTorch or C++ ABI is refused before it is loaded.
  const std::optional<PluginStamp> stamp = read_plugin_stamp(path);
  if (stamp)
    check_compatible(path, stamp->abi_version, stamp->kind, stamp->name, stamp->torch_version,
                     stamp->cxx_abi);

  boost::dll::shared_library lib;
  boost::dll::fs::error_code ec;
  lib.load(path, boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local, ec);
  if (ec) {
    const char* why = ::dlerror();  // Boost.DLL keeps only a generic error code
    const std::string who = stamp ? path + " (" + stamp->name + ")" : path;
    throw UserError(
        detail::concat("plugin ", who, ": cannot be loaded: ", why ? why : ec.message()));
  }
  // Never unloaded, even when refused below: its static initialisers have run and may have
  // registered things (operators, autograd functions) that must stay valid. The handle is
  // handed to impl_ on every way out of this function (declared before the lock below, so it
  // is destroyed after that is released).
  struct KeepLoaded {
    Impl& impl;
    boost::dll::shared_library& lib;
    ~KeepLoaded() {
      std::lock_guard<std::mutex> lock(impl.mu);
      impl.libraries.push_back(std::move(lib));
    }
  } keep{*impl_, lib};
  QTUNE_CHECK(lib.has("qtune_plugin_info"), "plugin ", path,
              ": not a qtune plugin (no qtune_plugin_info symbol)");
  const PluginInfo* info = lib.get_alias<const PluginInfo*()>("qtune_plugin_info")();
  QTUNE_CHECK(info != nullptr, "plugin ", path, ": qtune_plugin_info returned null");
  // The ABI version comes first: the rest of the record is only meaningful when it matches.
  if (info->abi_version != kPluginAbiVersion)
    check_compatible(path, info->abi_version, "", "", "", "");
  const std::string kind = or_empty(info->kind), name = or_empty(info->name);
  check_compatible(path, info->abi_version, kind, name, or_empty(info->torch_version),
                   or_empty(info->cxx_abi));
  const PluginRecord record{kind, name, or_empty(info->version), path};
  // The path of the plugin of this kind and name loaded before, if any.
  auto earlier = [&]() -> std::optional<std::string> {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (kind == "quant") {
      auto it = impl_->quant.find(name);
      if (it != impl_->quant.end()) return it->second.second.path;
    } else {
      auto it = impl_->adapter.find(name);
      if (it != impl_->adapter.end()) return it->second.second.path;
    }
    return std::nullopt;
  };
  if (const auto first = earlier()) {
    std::error_code ec;
    if (fs::equivalent(*first, path, ec)) {  // the same file reached twice: nothing is hidden
      spdlog::debug("plugin {} ({}) already loaded", path, name);
      return;
    }
    const std::string msg =
        detail::concat(kind, " plugin ", name, " in ", path, " is shadowed by ", *first,
                       ", found earlier in the search path; it is "
                       "not used");
    spdlog::warn("{}", msg);
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->shadowed.push_back(msg);
    return;
  }
  // The factory is plugin code: whatever it throws is reported with the plugin's path and name.
  // It runs without the lock held, so it may use the registry.
  std::shared_ptr<QuantBackend> backend;
  std::shared_ptr<AdapterFactory> factory;
  const std::string who = "plugin " + path + " (" + name + ")";
  try {
    if (kind == "quant")
      backend.reset(lib.get_alias<QuantFactoryFn>("qtune_plugin_factory")());
    else
      factory.reset(lib.get_alias<AdapterFactoryFn>("qtune_plugin_factory")());
  } catch (const std::exception& e) {
    throw UserError(detail::concat(who, ": factory failed: ", e.what()));
  } catch (...) {
    throw UserError(detail::concat(who, ": factory failed with a non-standard exception"));
  }
  QTUNE_CHECK(backend || factory, who, ": factory returned null");
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (backend)
    impl_->quant.emplace(name, std::make_pair(backend, record));  // the first of a name wins
  else
    impl_->adapter.emplace(name, std::make_pair(factory, record));
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

std::vector<std::string> Registry::shadowed() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->shadowed;
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

std::string plugin_listing(const Registry& registry) {
  std::string out = detail::concat(std::left, std::setw(8), "kind", " ", std::setw(10), "name", " ",
                                   std::setw(10), "version", " path\n");
  for (const auto& p : registry.plugins()) {
    out += detail::concat(std::left, std::setw(8), p.kind, " ", std::setw(10), p.name, " ",
                          std::setw(10), p.version, " ", p.path, "\n");
    const std::vector<OptionSpec> schema = p.kind == "quant"
                                               ? registry.quant(p.name)->option_schema()
                                               : registry.adapter(p.name)->option_schema();
    for (const auto& o : schema)
      out +=
          detail::concat("    ", std::left, std::setw(28), o.name + " = " + o.default_value.dump(),
                         " ", std::setw(30), describe_option_range(o), " ", o.help, "\n");
  }
  for (const auto& s : registry.shadowed()) out += "shadowed " + s + "\n";
  for (const auto& e : registry.errors()) out += "failed   " + e + "\n";
  return out;
}

}  // namespace qtune
