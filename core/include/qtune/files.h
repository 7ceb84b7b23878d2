// Reading small files (configs, summaries, pointers) with errors that name the file, and the size
// of an output directory. Writes go through atomic_file.h.
#pragma once

#include <cstdint>
#include <string>

#include "qtune/export.h"
#include "qtune/options.h"

namespace qtune {

/// The whole file as bytes; UserError "cannot read <path>" when it cannot be opened.
QTUNE_API std::string read_text_file(const std::string& path);

/// The file parsed as JSON; UserError naming the file when it cannot be read or is not JSON
/// ("<path>: not valid JSON (...)").
QTUNE_API Json read_json_file(const std::string& path);

/// Total bytes of the regular files directly inside `dir` (0 when it cannot be listed).
QTUNE_API int64_t directory_bytes(const std::string& dir);

}  // namespace qtune
