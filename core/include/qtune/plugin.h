// What a plugin exports: one info record (checked before anything else is touched) and one
// factory. A plugin source file ends with exactly one QTUNE_QUANT_PLUGIN(...) or
// QTUNE_ADAPTER_PLUGIN(...) line.
#pragma once

#include <cstdint>

#include <boost/dll/alias.hpp>
#include <torch/torch.h>

#include "qtune/adapter.h"
#include "qtune/quantized_weight.h"

namespace qtune {

/// Bump whenever a change to an exported interface (QuantizedWeight, QuantBackend, Adapter,
/// AdapterFactory, TensorState, OptionSpec, PluginInfo) would break a plugin built before it.
constexpr uint32_t kPluginAbiVersion = 1;

#ifndef QTUNE_PLUGIN_ABI_VERSION
#define QTUNE_PLUGIN_ABI_VERSION ::qtune::kPluginAbiVersion
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

#define QTUNE_DETAIL_PLUGIN(KIND, NAME, VERSION, FACTORY_TYPE, CLASS)                        \
  namespace qtune_plugin_detail {                                                            \
  static const ::qtune::PluginInfo* info() {                                                 \
    static const ::qtune::PluginInfo record{QTUNE_PLUGIN_ABI_VERSION, KIND, NAME, VERSION,   \
                                            TORCH_VERSION, QTUNE_CXX_ABI_TAG};               \
    return &record;                                                                          \
  }                                                                                          \
  static FACTORY_TYPE* factory() { return new CLASS(); }                                     \
  }                                                                                          \
  BOOST_DLL_ALIAS(qtune_plugin_detail::info, qtune_plugin_info)                              \
  BOOST_DLL_ALIAS(qtune_plugin_detail::factory, qtune_plugin_factory)

/// Registers a quantization backend class (default-constructible, derives QuantBackend).
#define QTUNE_QUANT_PLUGIN(NAME, VERSION, CLASS) \
  QTUNE_DETAIL_PLUGIN("quant", NAME, VERSION, ::qtune::QuantBackend, CLASS)
/// Registers an adapter factory class (default-constructible, derives AdapterFactory).
#define QTUNE_ADAPTER_PLUGIN(NAME, VERSION, CLASS) \
  QTUNE_DETAIL_PLUGIN("adapter", NAME, VERSION, ::qtune::AdapterFactory, CLASS)
