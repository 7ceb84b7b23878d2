// The bodies of the libFuzzer targets, one per parser of outside input, shared by the fuzz
// executables (fuzz_main.cpp, built with QTUNE_FUZZ=ON under clang) and by the regression test
// of the default build (test_fuzz_regressions.cpp), so a crashing input kept in
// tests/fuzz/regressions/<target>/ is replayed through exactly the code that found it.
//
// Contract of an entry: it feeds `data` to the real public loader (through a file in a private
// scratch folder when the API takes a path) and touches what the loader returns. A UserError
// is the expected outcome for bad input and leaves the entry; anything else (another
// exception, a crash, a sanitizer report, a hang, an unbounded allocation) is a finding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace qtune::fuzz {

using Entry = void (*)(const uint8_t* data, size_t size);

struct Target {
  const char* name;  ///< also the folder name under seeds/ and regressions/
  Entry entry;
};

/// Every target, in a fixed order.
const std::vector<Target>& targets();

/// The entry named `name`; throws std::invalid_argument when there is none.
Entry find_target(const std::string& name);

/// The per-process scratch folder the entries write their files into ($QTUNE_FUZZ_TMP, else
/// /dev/shm or the temp folder), created on first use and removed at exit.
const std::string& scratch_dir();

}  // namespace qtune::fuzz
