// resolve_options: defaults filled, unknown keys and wrong types rejected with the key named.
#include <gtest/gtest.h>

#include "qtune/error.h"
#include "qtune/options.h"

using qtune::Json;

namespace {
std::vector<qtune::OptionSpec> schema() {
  return {{"rank", 8, "rank"}, {"alpha", 16.0, "scale"}, {"init", "kaiming", "init"}};
}
std::string error_of(const Json& user) {
  try {
    qtune::resolve_options(schema(), user, "adapter.options");
  } catch (const qtune::UserError& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Options, DefaultsFilledAndIntegerAcceptedAsFloat) {
  Json r = qtune::resolve_options(schema(), Json{{"alpha", 32}}, "adapter.options");
  EXPECT_EQ(r["rank"], 8);
  EXPECT_TRUE(r["alpha"].is_number_float());
  EXPECT_DOUBLE_EQ(r["alpha"].get<double>(), 32.0);
  EXPECT_EQ(r["init"], "kaiming");
}

TEST(Options, UnknownKeyNamed) {
  auto msg = error_of(Json{{"rnak", 4}});
  EXPECT_NE(msg.find("adapter.options.rnak"), std::string::npos) << msg;
  EXPECT_NE(msg.find("rank"), std::string::npos) << msg;
}

TEST(Options, WrongTypeNamed) {
  auto msg = error_of(Json{{"rank", "eight"}});
  EXPECT_NE(msg.find("adapter.options.rank must be an integer"), std::string::npos) << msg;
  msg = error_of(Json{{"rank", 2.5}});
  EXPECT_NE(msg.find("adapter.options.rank"), std::string::npos) << msg;
}
