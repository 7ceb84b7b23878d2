// Crash-safe file replacement: write a temporary file in the destination's directory, fsync it,
// rename it over the destination, fsync the directory. Readers see either the old file or the
// complete new one, never a torn write; an interrupted or failed write leaves the old file as it
// was. Model exports and training checkpoints go through here.
#pragma once

#include <functional>
#include <ostream>
#include <string>

#include "qtune/export.h"

namespace qtune {

/// Replaces `path` atomically with what `writer` streams into the given std::ostream.
/// The temporary file is `<dir>/.<name>.tmp-XXXXXX` (same filesystem, so rename(2) is atomic).
/// If `writer` throws, or any write / fsync / rename fails, the temporary file is removed, `path`
/// is untouched and the exception propagates (I/O failures throw UserError naming the path and
/// strerror). The new file gets the mode of the file it replaces, or 0644 when there is none.
/// The destination directory must exist.
QTUNE_API void atomic_write(const std::string& path,
                            const std::function<void(std::ostream&)>& writer);

/// atomic_write of a string's bytes.
QTUNE_API void atomic_write_string(const std::string& path, const std::string& content);

/// fsync(2) on a directory, so a rename or create inside it survives a power loss. Throws
/// UserError naming the directory on failure.
QTUNE_API void fsync_directory(const std::string& dir);

}  // namespace qtune
