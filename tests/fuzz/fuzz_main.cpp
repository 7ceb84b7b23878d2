// The libFuzzer entry point of one target: QTUNE_FUZZ_TARGET names it (fuzz_entries.cpp). A
// UserError is the expected answer to bad input; any other exception is reported with its type
// and message and aborts, which libFuzzer records as a crash and saves the input.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <typeinfo>

#include "fuzz_entries.h"
#include "qtune/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const qtune::fuzz::Entry entry = qtune::fuzz::find_target(QTUNE_FUZZ_TARGET);
  try {
    entry(data, size);
  } catch (const qtune::UserError&) {
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz %s: not a UserError: %s: %s\n", QTUNE_FUZZ_TARGET, typeid(e).name(),
                 e.what());
    std::abort();
  } catch (...) {
    std::fprintf(stderr, "fuzz %s: non-standard exception\n", QTUNE_FUZZ_TARGET);
    std::abort();
  }
  return 0;
}
