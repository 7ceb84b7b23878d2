// Helpers shared by the test suites: where the shared data and the built tree are, and running a
// built program to capture its exit code and output.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "qtune/model_config.h"
#include "qtune/tuning_spec.h"

namespace qtune {
class Registry;
struct DataConfig;
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
/// The training losses of the run in `out_dir`, from its metrics.jsonl (index = step - 1); a test
/// failure when a step is missing or out of order.
std::vector<double> train_losses(const std::string& out_dir);

/// The message of the qtune::UserError `f` throws, or "(no error)".
std::string user_error_of(const std::function<void()>& f);
/// The message of the qtune::UserError `f` throws; a test failure (and "") when it throws none.
std::string error_of(const std::function<void()>& f);
/// Writes `content` to `name` in a temporary directory of `tag` (one per tag and process);
/// returns its path.
std::string write_temp_file(const std::string& tag, const std::string& name,
                            const std::string& content);
/// The message of the UserError that loading `c` with a CharTokenizer throws, or "".
std::string load_data_error(const DataConfig& c);
/// A non-fatal gtest failure when `part` is not in `text` (both are printed).
void expect_contains(const std::string& text, const std::string& part);

/// A 2-layer Llama small enough for exact checks: `hidden` wide (16: 4 query / 2 key-value
/// heads), MLP 40, vocabulary 32, context 64.
ModelConfig tiny_config(int64_t hidden = 16, bool tied = false);
/// LoRA rank 4 on every projection and the output head, computing in `dtype`.
TuningSpec lora_spec(torch::ScalarType dtype = torch::kFloat32);

}  // namespace qtune::test
