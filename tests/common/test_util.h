// Helpers shared by the test suites: where the shared data and the built tree are, and running a
// built program to capture its exit code and output.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "qtune/model_config.h"

namespace qtune {
class Registry;
}

namespace qtune::test {

/// A registry holding the plugins of this build (build/lib/qtune/plugins), scanned once.
Registry& plugins();

/// ../shared/data (or $QTUNE_DATA). Fails the calling test loudly (ADD_FAILURE + throw) when the
/// folder or `file` in it is missing: data tests never skip silently.
std::string data_path(const std::string& file = "");
/// The CMake build dir (for bin/ and lib/qtune/plugins).
std::string build_dir();
std::string source_dir();
std::string bin_path(const std::string& program);
std::string plugin_dir();

/// A fresh empty temporary directory, removed when the process exits.
std::string temp_dir(const std::string& tag);

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};
/// Starts `args[0]` with the rest as arguments (no shell) and `env` ("KEY=value") added, its
/// stdout and stderr going to the file `log`; returns the child's pid (wait for it yourself).
pid_t spawn(const std::vector<std::string>& args, const std::vector<std::string>& env,
            const std::string& log);
/// Runs `args[0]` with the rest as arguments (no shell), capturing output.
RunResult run_program(const std::vector<std::string>& args,
                      const std::vector<std::string>& env = {});

std::string read_file(const std::string& path);

/// The message of the qtune::UserError `f` throws, or "(no error)".
std::string user_error_of(const std::function<void()>& f);
/// A non-fatal gtest failure when `part` is not in `text` (both are printed).
void expect_contains(const std::string& text, const std::string& part);

/// A 2-layer Llama small enough for exact checks: `hidden` wide (16: 4 query / 2 key-value
/// heads), MLP 40, vocabulary 32, context 64.
ModelConfig tiny_config(int64_t hidden = 16, bool tied = false);

}  // namespace qtune::test
