// Reading a plugin library's PluginStamp (plugin.h) from the file, without loading it: what the
// registry checks before it dlopen()s a library, and what the plugin_stamp fuzz target feeds.
#pragma once

#include <optional>
#include <string>

#include "qtune/export.h"
#include "qtune/plugin.h"

namespace qtune {

/// The stamp in the ".qtune_plugin" section of the ELF file at `path`; nullopt when the file
/// cannot be read, is not a 64-bit little-endian ELF, or has no section holding a complete stamp
/// whose magic matches and whose strings are NUL-terminated inside their fields. Never throws
/// for the file's content; reads at most the section headers, the section-name table (1 MiB at
/// most) and the stamp.
QTUNE_API std::optional<PluginStamp> read_plugin_stamp(const std::string& path);

}  // namespace qtune
