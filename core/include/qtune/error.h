// Error types. A UserError is something the person running qtune can fix (a bad path, key, value
// or file); apps print its message as one line and exit 2. An InternalError is a broken
// invariant: a bug in qtune or a plugin that misbehaves (a factory that returns null, a weight
// of the wrong shape); apps print "internal error" and exit 3. Anything else (LibTorch, the
// standard library) exits 1.
#pragma once

#include <c10/util/ArrayRef.h>

#include <stdexcept>
#include <string>

#include "qtune/export.h"

namespace qtune {

/// An error caused by user input: the message names the file, key or value and what was expected.
class QTUNE_API UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& what) : std::runtime_error(what) {}
};

/// A broken invariant or a misbehaving plugin; the message names the plugin where there is one.
class QTUNE_API InternalError : public std::logic_error {
 public:
  explicit InternalError(const std::string& what) : std::logic_error(what) {}
};

}  // namespace qtune

/// Throws qtune::InternalError with a streamed message when `cond` is false: for what no input
/// can cause, only a bug in qtune or a plugin.
/// Example: QTUNE_INTERNAL_ASSERT(q, "plugin '", name, "' returned no weight");
#define QTUNE_INTERNAL_ASSERT(cond, ...)                                                \
  do {                                                                                  \
    if (!(cond)) throw ::qtune::InternalError(::qtune::detail::concat(__VA_ARGS__));     \
  } while (0)

/// Throws qtune::UserError with a streamed message when `cond` is false.
/// Example: QTUNE_CHECK(rank > 0, "lora.rank must be > 0, got ", rank);
#define QTUNE_CHECK(cond, ...)                                                  \
  do {                                                                          \
    if (!(cond)) throw ::qtune::UserError(::qtune::detail::concat(__VA_ARGS__)); \
  } while (0)

#include <sstream>
namespace qtune::detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace qtune::detail

namespace qtune {
/// A shape as messages show it: "[4096, 11008]".
inline std::string shape_str(c10::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}
}  // namespace qtune
