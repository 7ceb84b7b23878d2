// The LoRA plugin through the registry, as users get it: loading the built .so from a folder of
// our choosing, and refusing a copy built for another plugin ABI (qtune_lora_abi999).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "qtune/error.h"
#include "qtune/plugin.h"
#include "qtune/registry.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

// Copies the plugin into `dir` under `name` and returns the new path.
std::string copy_into(const std::string& plugin, const std::string& dir, const std::string& name) {
  if (!fs::exists(plugin)) {
    ADD_FAILURE() << "plugin not built: " << plugin;
    return "";
  }
  const auto to = (fs::path(dir) / name).string();
  fs::copy_file(plugin, to, fs::copy_options::overwrite_existing);
  return to;
}

}  // namespace

TEST(LoraRegistry, LoadsTheLoraPluginFromATempDir) {
  const auto dir = qtune::test::temp_dir("lora-plugin");
  const auto path = copy_into(QTUNE_TEST_LORA_PLUGIN, dir, "libqtune_lora.so");
  qtune::Registry registry;
  registry.load_library(path);

  const auto plugins = registry.plugins();
  ASSERT_EQ(plugins.size(), 1u);
  EXPECT_EQ(plugins[0].kind, "adapter");
  EXPECT_EQ(plugins[0].name, "lora");
  EXPECT_FALSE(plugins[0].version.empty());
  EXPECT_EQ(plugins[0].path, path);

  auto factory = registry.adapter("lora");
  EXPECT_EQ(factory->name(), "lora");
  auto adapter = factory->create(24, 12, {{"rank", 4}, {"alpha", 8.0}});
  std::set<std::string> names;
  for (const auto& p : adapter->named_parameters()) names.insert(p.key());
  EXPECT_EQ(names, (std::set<std::string>{"lora_A.weight", "lora_B.weight"}));
  auto y = adapter->forward(torch::randn({2, 24}));
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 12}));
  EXPECT_EQ(adapter->peft_config()["r"], 4);

  // Option errors raised inside the plugin reach us as qtune::UserError.
  try {
    factory->create(24, 12, {{"rank", -1}});
    ADD_FAILURE() << "rank -1 accepted";
  } catch (const qtune::UserError& e) {
    EXPECT_NE(std::string(e.what()).find("adapter.options.rank"), std::string::npos) << e.what();
  }
}

TEST(LoraRegistry, RefusesAPluginBuiltForAnotherAbi) {
  const auto dir = qtune::test::temp_dir("lora-abi");
  const auto path = copy_into(QTUNE_TEST_LORA_ABI999_PLUGIN, dir, "libqtune_lora_abi999.so");
  qtune::Registry registry;
  std::string msg;
  try {
    registry.load_library(path);
  } catch (const qtune::UserError& e) {
    msg = e.what();
  }
  ASSERT_FALSE(msg.empty()) << "a plugin built for ABI 999 was accepted";
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("999"), std::string::npos) << msg;
  EXPECT_NE(msg.find("version " + std::to_string(qtune::kPluginAbiVersion)), std::string::npos)
      << msg;
  EXPECT_TRUE(registry.plugins().empty());
  EXPECT_THROW(registry.adapter("lora"), qtune::UserError);
}

TEST(LoraRegistry, ScanLoadsTheGoodPluginAndRecordsTheBadOne) {
  const auto dir = qtune::test::temp_dir("lora-scan");
  copy_into(QTUNE_TEST_LORA_PLUGIN, dir, "libqtune_lora.so");
  const auto bad = copy_into(QTUNE_TEST_LORA_ABI999_PLUGIN, dir, "libqtune_lora_abi999.so");
  // Not a library at all: skipped by name (scan only looks at lib*.so).
  std::ofstream(fs::path(dir) / "README.txt") << "not a plugin\n";

  qtune::Registry registry;
  registry.scan({dir});
  const auto errors = registry.errors();
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].find(bad), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("999"), std::string::npos) << errors[0];
  ASSERT_EQ(registry.plugins().size(), 1u);
  EXPECT_EQ(registry.plugins()[0].name, "lora");
  auto adapter = registry.adapter("lora")->create(8, 8, nullptr);
  EXPECT_EQ(adapter->peft_config()["r"], 8);
}
