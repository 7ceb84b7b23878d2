// What a plugin exports: one info record (checked before anything else is touched) and one
// factory. A plugin source file ends with exactly one QTUNE_QUANT_PLUGIN(...) or
// QTUNE_ADAPTER_PLUGIN(...) line. docs/writing-a-plugin.md explains the whole contract.
#pragma once

#include <cstdint>

#include <boost/dll/alias.hpp>
#include <torch/torch.h>

#include "qtune/adapter.h"
#include "qtune/quantized_weight.h"

namespace qtune {

/// Bump whenever a change to an exported interface (QuantizedWeight, QuantBackend, Adapter,
/// AdapterFactory, TensorState, OptionSpec, PluginInfo) would break a plugin built before it.
// 2: Adapter::bind_base and Adapter::apply; OptionSpec min/max/choices,
//    QuantBackend::check_options and AdapterFactory::check_options.
// 3: QuantBackend::load_is_cheap (sharded bases).
constexpr uint32_t kPluginAbiVersion = 3;

// Overridable for tests only (a plugin that claims another ABI or LibTorch must be refused).
#ifndef QTUNE_PLUGIN_ABI_VERSION
#define QTUNE_PLUGIN_ABI_VERSION ::qtune::kPluginAbiVersion
#endif
#ifndef QTUNE_PLUGIN_TORCH_VERSION
#define QTUNE_PLUGIN_TORCH_VERSION TORCH_VERSION
#endif

/// Plain-data record every plugin exports; it begins with the ABI version so the loader can
/// check it before reading anything else.
struct PluginInfo {
  uint32_t abi_version;
  const char* kind;           // "quant" or "adapter"
  const char* name;           // what --quant / --adapter selects
  const char* version;        // the plugin's own version
  const char* torch_version;  // TORCH_VERSION the plugin was compiled against
  const char* cxx_abi;        // "cxx11" or "pre-cxx11" (_GLIBCXX_USE_CXX11_ABI)
};

/// The same facts as plain bytes (no pointers, so no relocations) in the ELF section
/// ".qtune_plugin": the registry reads them from the file *before* loading the library. A plugin
/// built against another LibTorch often cannot even be dlopen()ed (its LibTorch symbols do not
/// resolve), and if it can, loading it runs that LibTorch's static initialisers; reading the
/// stamp first turns both into a clear refusal naming the two versions. Plugins without a stamp
/// (none in this tree) are checked through PluginInfo after loading. Changing this layout means
/// changing the magic.
struct PluginStamp {
  char magic[16];  // QTUNE_PLUGIN_STAMP_MAGIC, NUL-terminated
  uint32_t abi_version;
  char kind[12];
  char name[64];  // the QTUNE_*_PLUGIN macros take string literals, so a longer one won't compile
  char version[32];
  char torch_version[32];
  char cxx_abi[16];
};
#define QTUNE_PLUGIN_STAMP_MAGIC "qtune-plugin-v1"
#define QTUNE_PLUGIN_STAMP_SECTION ".qtune_plugin"

#if defined(_GLIBCXX_USE_CXX11_ABI) && _GLIBCXX_USE_CXX11_ABI == 0
#define QTUNE_CXX_ABI_TAG "pre-cxx11"
#else
#define QTUNE_CXX_ABI_TAG "cxx11"
#endif

/// The C++ ABI tag of whatever translation unit includes this header.
inline const char* cxx_abi_tag() { return QTUNE_CXX_ABI_TAG; }

using QuantFactoryFn = QuantBackend*();
using AdapterFactoryFn = AdapterFactory*();

}  // namespace qtune

/// Exported symbol names (Boost.DLL aliases).
#define QTUNE_PLUGIN_INFO_SYMBOL qtune_plugin_info
#define QTUNE_PLUGIN_FACTORY_SYMBOL qtune_plugin_factory

#define QTUNE_DETAIL_PLUGIN(KIND, NAME, VERSION, FACTORY_TYPE, CLASS)                              \
  namespace qtune_plugin_detail {                                                                  \
  __attribute__((used, section(QTUNE_PLUGIN_STAMP_SECTION))) constexpr ::qtune::PluginStamp stamp{ \
      QTUNE_PLUGIN_STAMP_MAGIC,   QTUNE_PLUGIN_ABI_VERSION, KIND, NAME, VERSION,                   \
      QTUNE_PLUGIN_TORCH_VERSION, QTUNE_CXX_ABI_TAG};                                              \
  /* The record points into the stamp: one source of truth, and a reference that keeps the */      \
  /* stamp's section alive under --gc-sections. */                                                 \
  static const ::qtune::PluginInfo* info() {                                                       \
    static constexpr ::qtune::PluginInfo record{stamp.abi_version,   stamp.kind,                   \
                                                stamp.name,          stamp.version,                \
                                                stamp.torch_version, stamp.cxx_abi};               \
    return &record;                                                                                \
  }                                                                                                \
  static FACTORY_TYPE* factory() { return new CLASS(); }                                           \
  }                                                                                                \
  BOOST_DLL_ALIAS(qtune_plugin_detail::info, qtune_plugin_info)                                    \
  BOOST_DLL_ALIAS(qtune_plugin_detail::factory, qtune_plugin_factory)

/// Registers a quantization backend class (default-constructible, derives QuantBackend).
#define QTUNE_QUANT_PLUGIN(NAME, VERSION, CLASS) \
  QTUNE_DETAIL_PLUGIN("quant", NAME, VERSION, ::qtune::QuantBackend, CLASS)
/// Registers an adapter factory class (default-constructible, derives AdapterFactory).
#define QTUNE_ADAPTER_PLUGIN(NAME, VERSION, CLASS) \
  QTUNE_DETAIL_PLUGIN("adapter", NAME, VERSION, ::qtune::AdapterFactory, CLASS)
