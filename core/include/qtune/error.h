// Error types. A UserError is something the person running qtune can fix (a bad path, key, value
// or file); apps print its message as one line and exit 2. Anything else is a bug.
#pragma once

#include <stdexcept>
#include <string>

#include "qtune/export.h"

namespace qtune {

/// An error caused by user input: the message names the file, key or value and what was expected.
class QTUNE_API UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace qtune

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
