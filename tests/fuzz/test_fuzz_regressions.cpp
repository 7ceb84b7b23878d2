// Replays every input kept under tests/fuzz/seeds/<target>/ and tests/fuzz/regressions/<target>/
// (the crashes fuzzing found, each fixed in core) through the fuzz target's own body: each must
// end in success or a qtune::UserError, never another exception (a crash fails the whole test).
// Part of the default suite, so a fixed finding stays fixed in the ordinary gcc build too.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <typeinfo>
#include <vector>

#include "fuzz_entries.h"
#include "qtune/error.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

fs::path fuzz_dir() { return fs::path(qtune::test::source_dir()) / "tests" / "fuzz"; }

std::vector<fs::path> inputs_of(const std::string& target) {
  std::vector<fs::path> files;
  for (const char* kind : {"seeds", "regressions"}) {
    const fs::path dir = fuzz_dir() / kind / target;
    if (!fs::is_directory(dir)) continue;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_regular_file() && e.path().filename().string()[0] != '.') files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  return files;
}

class FuzzRegression : public ::testing::TestWithParam<std::string> {};

TEST_P(FuzzRegression, EveryKeptInputGivesSuccessOrUserError) {
  const std::string target = GetParam();
  const qtune::fuzz::Entry entry = qtune::fuzz::find_target(target);
  const std::vector<fs::path> files = inputs_of(target);
  // Every target has at least one hand-written seed in git, so an empty list is a broken tree.
  ASSERT_FALSE(files.empty()) << "no inputs under " << fuzz_dir().string()
                              << "/{seeds,regressions}/" << target;
  for (const fs::path& p : files) {
    std::ifstream f(p, std::ios::binary);
    ASSERT_TRUE(f) << "cannot read " << p;
    const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    // QTUNE_FUZZ_VERBOSE=1 prints each input's outcome (is a seed still valid?).
    const bool verbose = std::getenv("QTUNE_FUZZ_VERBOSE") != nullptr;
    try {
      entry(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
      if (verbose) std::cout << p.filename().string() << ": ok\n";
    } catch (const qtune::UserError& e) {
      if (verbose) std::cout << p.filename().string() << ": UserError: " << e.what() << "\n";
    } catch (const std::exception& e) {
      ADD_FAILURE() << p << ": " << typeid(e).name() << " instead of a UserError: " << e.what();
    }
  }
}

std::vector<std::string> target_names() {
  std::vector<std::string> names;
  for (const auto& t : qtune::fuzz::targets()) names.push_back(t.name);
  return names;
}

INSTANTIATE_TEST_SUITE_P(Fuzz, FuzzRegression, ::testing::ValuesIn(target_names()),
                         [](const auto& info) { return info.param; });

}  // namespace
