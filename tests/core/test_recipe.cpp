// Recipes: every shipped config parses, begins with the command that runs it and resolves
// against the real plugins; merging rejects unknown keys and wrong types by name.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "qtune/error.h"
#include "qtune/recipe.h"
#include "qtune/registry.h"
#include "qtune/train.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace qtune;

TEST(Recipe, EveryShippedConfigParsesAndStartsWithItsCommand) {
  int count = 0;
  Registry reg;
  reg.scan({test::plugin_dir()});
  setenv("QTUNE_DATA", test::data_path().c_str(), 1);
  for (const auto& e : fs::directory_iterator(test::source_dir() + "/configs")) {
    if (e.path().extension() != ".yaml") continue;
    ++count;
    const std::string rel = "configs/" + e.path().filename().string();
    std::ifstream in(e.path());
    std::string first;
    std::getline(in, first);
    EXPECT_EQ(first.rfind("# build/bin/trainer --config " + rel, 0), 0u)
        << rel << " must begin with the command that runs it, got: " << first;
    Json r = recipe_defaults();
    merge_recipe(r, load_yaml_file(e.path().string()), rel);
    EXPECT_NO_THROW(resolve_recipe(r, reg)) << rel;
  }
  EXPECT_GE(count, 3);
}

TEST(Recipe, OverridesAreTypedAndChecked) {
  Json r = recipe_defaults();
  apply_override(r, "train.lr=1e-4");
  EXPECT_DOUBLE_EQ(r["train"]["lr"].get<double>(), 1e-4);
  apply_override(r, "train.lr=1");  // an integer is a fine float
  EXPECT_TRUE(r["train"]["lr"].is_number_float());
  apply_override(r, "adapter.target_modules=[q, v]");
  EXPECT_EQ(r["adapter"]["target_modules"], Json({"q", "v"}));
  apply_override(r, "adapter.options.rank=4");
  apply_override(r, "adapter.options.alpha=8");
  EXPECT_EQ(r["adapter"]["options"]["rank"], 4);
  EXPECT_EQ(r["adapter"]["options"]["alpha"], 8);
  auto error_of = [&](const std::string& o) {
    try {
      apply_override(r, o);
    } catch (const UserError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(error_of("train.lrr=1").find("train.lrr"), std::string::npos);
  EXPECT_NE(error_of("train.max_steps=1.5").find("train.max_steps must be an integer"),
            std::string::npos);
  EXPECT_NE(error_of("seed").find("key.path=value"), std::string::npos);
}

TEST(Recipe, ValidationNamesTheKey) {
  Json r = recipe_defaults();
  r["train"]["max_steps"] = 0;
  try {
    validate_recipe(r);
    FAIL();
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("train.max_steps must be > 0"), std::string::npos);
  }
  const auto dir = test::temp_dir("yaml");
  std::ofstream(dir + "/bad.yaml") << "train: [1, 2\n";
  try {
    load_yaml_file(dir + "/bad.yaml");
    FAIL();
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("bad.yaml"), std::string::npos) << e.what();
  }
}

TEST(Recipe, LearningRateScheduleWarmsUpThenDecays) {
  EXPECT_DOUBLE_EQ(lr_at(5, 100, 10, 1.0, 0.1), 0.5);
  EXPECT_DOUBLE_EQ(lr_at(10, 100, 10, 1.0, 0.1), 1.0);
  EXPECT_NEAR(lr_at(55, 100, 10, 1.0, 0.1), 0.55, 1e-12);  // halfway down the cosine
  EXPECT_NEAR(lr_at(100, 100, 10, 1.0, 0.1), 0.1, 1e-12);
}

TEST(Recipe, DocsTableIsTheDeclaredKeys) {
  // docs/cli.md shows the key table recipe.cpp declares; regenerate it with
  // `build/bin/trainer --recipe-keys` when a key changes.
  const std::string doc = test::read_file(test::source_dir() + "/docs/cli.md");
  const std::string open = "<!-- recipe-keys -->\n", close = "<!-- /recipe-keys -->";
  const auto a = doc.find(open), b = doc.find(close);
  ASSERT_NE(a, std::string::npos) << "docs/cli.md lacks " << open;
  ASSERT_NE(b, std::string::npos) << "docs/cli.md lacks " << close;
  EXPECT_EQ(doc.substr(a + open.size(), b - a - open.size()), recipe_keys_markdown());
  // Every key of the defaults is declared once, with a line of documentation.
  std::set<std::string> seen;
  for (const auto& k : recipe_keys()) {
    EXPECT_TRUE(seen.insert(k.path).second) << k.path << " declared twice";
    EXPECT_FALSE(k.doc.empty()) << k.path;
  }
}

TEST(Recipe, TypedRecipeRoundTripsTheTree) {
  Json r = recipe_defaults();
  apply_override(r, "train.lr=2e-4");
  apply_override(r, "adapter.target_modules=all-linear");  // one name where a list goes
  apply_override(r, "quant.options.block_size=32");
  const Recipe typed = Recipe::from_json(r);
  EXPECT_DOUBLE_EQ(typed.train.lr, 2e-4);
  EXPECT_EQ(typed.adapter.target_modules, std::vector<std::string>{"all-linear"});
  EXPECT_EQ(typed.quant.options, Json({{"block_size", 32}}));
  EXPECT_EQ(typed.to_json(), r);
  r["train"]["beta2"] = 1.5;
  try {
    Recipe::from_json(r);
    FAIL();
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("train.beta2 must be in [0, 1), got 1.5"),
              std::string::npos)
        << e.what();
  }
}
