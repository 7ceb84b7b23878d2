// The robustness table: every class of bad input and fault, what qtune does with it, and the
// case that shows it. Each case builds its inputs in a fresh directory, runs a program as a user
// would, and checks the exit code and the one line it prints; docs/robustness.md is generated
// from this table (test Robustness.TableInDocsIsCurrent), so the two cannot drift.
#pragma once

#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "test_util.h"

namespace qtune::robustness {

/// What a case's set-up gets: a fresh directory of its own, and a place to keep things alive for
/// the run (a lock held by the test process, for instance).
struct Env {
  std::string dir;
  std::vector<std::shared_ptr<void>> keep;
};

struct Case {
  std::string section;  // the class of input or fault (a heading of docs/robustness.md)
  std::string name;     // unique, [A-Za-z0-9_]
  std::string input;    // the bad input or fault, in words
  std::function<std::vector<std::string>(Env&)> command;  // builds the inputs, returns argv
  int exit_code = 2;
  std::string expect;  // a part of the error line (exit 2), or of the output (exit 0)
  // Further checks after the run (what was kept, what was written).
  std::function<void(Env&, const test::RunResult&)> then;
};

/// gtest prints a case by its name.
inline void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

/// Every case, in table order.
const std::vector<Case>& cases();

/// The markdown table of docs/robustness.md.
std::string table_markdown();

}  // namespace qtune::robustness
