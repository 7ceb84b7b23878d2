// The main() every qtune program shares: run the program, turn a UserError (something the
// person can fix) into one line "<program>: error: ..." and exit code 2, and anything else into
// "<program>: internal error: ..." and exit code 1. Nothing else in qtune exits.
#pragma once

#include <cstdio>
#include <exception>

#include <c10/util/Exception.h>

#include "qtune/error.h"

namespace qtune::app {

template <typename Run>
int guarded_main(const char* program, Run&& run) {
  try {
    return run();
  } catch (const UserError& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    return 2;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s: internal error: %s\n", program, e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: internal error: %s\n", program, e.what());
    return 1;
  }
}

}  // namespace qtune::app

/// Defines main() calling `int RUN(int argc, char** argv)` under guarded_main.
#define QTUNE_APP_MAIN(PROGRAM, RUN)                                                        \
  int main(int argc, char** argv) {                                                         \
    return ::qtune::app::guarded_main(PROGRAM, [&] { return RUN(argc, argv); });            \
  }
