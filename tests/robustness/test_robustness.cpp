// Runs every case of the robustness table (robustness_cases.cpp) and checks docs/robustness.md
// holds the table the cases make.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>

#include "robustness_cases.h"

namespace {

using qtune::robustness::Case;

// The last non-empty line of a program's output.
std::string last_line(const std::string& out) {
  std::istringstream in(out);
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty()) last = line;
  return last;
}

class Robustness : public ::testing::TestWithParam<Case> {};

TEST_P(Robustness, Case) {
  const Case& k = GetParam();
  qtune::robustness::Env env{qtune::test::temp_dir("robustness-" + k.name), {}};
  const auto args = k.command(env);
  const auto r = qtune::test::run_program(args);
  ASSERT_EQ(r.exit_code, k.exit_code) << k.input << "\n" << r.output;
  if (k.exit_code == 2) {
    // One line "<program>: error: ...", never an internal error or a LibTorch message.
    const std::string line = last_line(r.output);
    EXPECT_NE(line.find(": error: "), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("internal error"), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("Exception raised from"), std::string::npos) << r.output;
    qtune::test::expect_contains(line, k.expect);
    RecordProperty("error", line);  // --gtest_output=json: every case's line, for review
  } else {
    qtune::test::expect_contains(r.output, k.expect);
  }
  if (k.then) k.then(env, r);
}

INSTANTIATE_TEST_SUITE_P(Table, Robustness, ::testing::ValuesIn(qtune::robustness::cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

TEST(RobustnessTable, NamesAreUniqueAndThereAreAtLeast150) {
  std::set<std::string> names;
  for (const auto& k : qtune::robustness::cases())
    EXPECT_TRUE(names.insert(k.name).second) << "two cases named " << k.name;
  EXPECT_GE(names.size(), 150u);
}

// docs/robustness.md holds the generated table between markers; QTUNE_UPDATE_DOCS=1 rewrites it.
TEST(RobustnessTable, TableInDocsIsCurrent) {
  const std::string path = qtune::test::source_dir() + "/docs/robustness.md";
  std::string doc = qtune::test::read_file(path);
  const std::string open = "<!-- robustness-table -->\n", close = "<!-- /robustness-table -->";
  const auto a = doc.find(open), b = doc.find(close);
  ASSERT_TRUE(a != std::string::npos && b != std::string::npos && a < b)
      << path << " needs the markers " << open << " and " << close;
  const std::string want = qtune::robustness::table_markdown() + "\n";
  const std::string have = doc.substr(a + open.size(), b - a - open.size());
  if (have == want) return;
  if (const char* u = std::getenv("QTUNE_UPDATE_DOCS"); u && std::string(u) == "1") {
    doc.replace(a + open.size(), b - a - open.size(), want);
    std::ofstream(path, std::ios::binary) << doc;
    return;
  }
  ADD_FAILURE() << path << " is out of date with tests/robustness/robustness_cases.cpp; run "
                << "QTUNE_UPDATE_DOCS=1 build/bin/qtune_robustness_tests "
                   "--gtest_filter=RobustnessTable.*";
}

}  // namespace
