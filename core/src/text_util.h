// Small string helpers shared by core's sources (internal, not installed with the SDK). One copy
// here: the unity build compiles several sources as one translation unit, where two file-local
// copies of a helper collide.
#pragma once

#include <cerrno>
#include <cstring>
#include <string>

namespace qtune::detail {

inline bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// strerror(errno), read when called.
inline std::string errno_text() { return std::strerror(errno); }

}  // namespace qtune::detail
