// The registry against plugins that must not load: built against another LibTorch (loadable or
// not), or whose factory throws. Each is refused with a message naming the file, the plugin and
// (for versions) both sides, and a scan still loads everything else. The plugins are built by
// tests/sdk/CMakeLists.txt into a test-only folder; the wrong plugin-ABI case is covered by
// tests/plugins/lora.
#include <gtest/gtest.h>

#include <filesystem>
#include <set>

#include "qtune/error.h"
#include "qtune/plugin.h"
#include "qtune/registry.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

// Copies lib<stem>.so from the test plugin folder into `dir`; returns the new path.
std::string copy_plugin(const std::string& stem, const std::string& dir) {
  const fs::path from = fs::path(QTUNE_SDK_TEST_PLUGIN_DIR) / ("lib" + stem + ".so");
  if (!fs::exists(from)) throw std::runtime_error("test plugin not built: " + from.string());
  const fs::path to = fs::path(dir) / from.filename();
  fs::copy_file(from, to, fs::copy_options::overwrite_existing);
  return to.string();
}

// The message load_library throws for `path`, or "" when it loads.
std::string refusal(qtune::Registry& registry, const std::string& path) {
  try {
    registry.load_library(path);
  } catch (const qtune::UserError& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

}  // namespace

TEST(SdkRegistry, LoadsTheExampleBackend) {
  const auto path = copy_plugin("qtune_int4", qtune::test::temp_dir("sdk-good"));
  qtune::Registry registry;
  registry.load_library(path);
  ASSERT_EQ(registry.plugins().size(), 1u);
  const auto rec = registry.plugins()[0];
  EXPECT_EQ(rec.kind, "quant");
  EXPECT_EQ(rec.name, "int4");
  EXPECT_EQ(rec.version, "1.0.0");
  EXPECT_EQ(rec.path, path);
  auto q = registry.quant("int4")->quantize(torch::randn({8, 70}), qtune::Json::object());
  EXPECT_EQ(q->backend(), "int4");
  EXPECT_EQ(q->dequantize(torch::kFloat, torch::kCPU).sizes(), torch::IntArrayRef({8, 70}));
}

TEST(SdkRegistry, RefusesAPluginBuiltAgainstAnotherLibTorch) {
  const auto path = copy_plugin("qtune_int4_torch999", qtune::test::temp_dir("sdk-torch"));
  qtune::Registry registry;
  const std::string msg = refusal(registry, path);
  ASSERT_FALSE(msg.empty()) << "a plugin built against LibTorch 9.9.9 was accepted";
  EXPECT_TRUE(contains(msg, path)) << msg;
  EXPECT_TRUE(contains(msg, "(int4)")) << msg;
  EXPECT_TRUE(contains(msg, "built against LibTorch 9.9.9")) << msg;
  EXPECT_TRUE(contains(msg, std::string("uses LibTorch ") + TORCH_VERSION)) << msg;
  EXPECT_TRUE(registry.plugins().empty());
  EXPECT_THROW(registry.quant("int4"), qtune::UserError);
}

TEST(SdkRegistry, RefusesAForeignPluginBeforeLoadingIt) {
  // dlopen() of this one fails (unresolved symbol); the stamp read from the file still lets the
  // refusal name both LibTorch versions instead of the loader's symbol error.
  const auto path = copy_plugin("qtune_foreign", qtune::test::temp_dir("sdk-foreign"));
  qtune::Registry registry;
  const std::string msg = refusal(registry, path);
  ASSERT_FALSE(msg.empty());
  EXPECT_TRUE(contains(msg, path)) << msg;
  EXPECT_TRUE(contains(msg, "(foreign)")) << msg;
  EXPECT_TRUE(contains(msg, "built against LibTorch 9.9.9")) << msg;
  EXPECT_TRUE(contains(msg, std::string("uses LibTorch ") + TORCH_VERSION)) << msg;
  EXPECT_FALSE(contains(msg, "undefined symbol")) << msg;
}

TEST(SdkRegistry, ReportsAThrowingFactoryByPathAndName) {
  const auto dir = qtune::test::temp_dir("sdk-throw");
  qtune::Registry registry;
  const auto path = copy_plugin("qtune_throwing", dir);
  const std::string msg = refusal(registry, path);
  EXPECT_TRUE(contains(msg, "plugin " + path + " (throwing): factory failed")) << msg;
  EXPECT_TRUE(contains(msg, "no such device (deliberate)")) << msg;

  const auto other = copy_plugin("qtune_throwing_nonstd", dir);
  const std::string msg2 = refusal(registry, other);
  EXPECT_TRUE(contains(msg2, "plugin " + other + " (throwing_nonstd): factory failed")) << msg2;
  EXPECT_TRUE(contains(msg2, "non-standard exception")) << msg2;
  EXPECT_TRUE(registry.plugins().empty());
}

TEST(SdkRegistry, ScanLoadsTheGoodPluginAndRecordsEveryBadOne) {
  const auto dir = qtune::test::temp_dir("sdk-scan");
  const std::vector<std::pair<std::string, std::string>> bad = {
      {copy_plugin("qtune_throwing", dir), "throwing"},
      {copy_plugin("qtune_throwing_nonstd", dir), "throwing_nonstd"},
      {copy_plugin("qtune_int4_torch999", dir), "int4"},
      {copy_plugin("qtune_foreign", dir), "foreign"}};
  copy_plugin("qtune_int4", dir);

  qtune::Registry registry;
  registry.scan({dir});
  const auto plugins = registry.plugins();
  ASSERT_EQ(plugins.size(), 1u);
  EXPECT_EQ(plugins[0].name, "int4");
  EXPECT_EQ(plugins[0].path, (fs::path(dir) / "libqtune_int4.so").string());
  EXPECT_EQ(registry.quant("int4")->name(), "int4");

  const auto errors = registry.errors();
  ASSERT_EQ(errors.size(), bad.size());
  for (const auto& [path, name] : bad) {
    int hits = 0;
    for (const auto& e : errors) hits += contains(e, "plugin " + path + " (" + name + ")");
    EXPECT_EQ(hits, 1) << path << " (" << name << ") not reported exactly once";
  }
  try {
    registry.quant("throwing");
    ADD_FAILURE() << "a plugin whose factory threw is available";
  } catch (const qtune::UserError& e) {
    EXPECT_TRUE(contains(e.what(), "available: int4")) << e.what();
  }
}

TEST(SdkRegistry, TrainerListsTheGoodPluginsAndTheFailures) {
  const auto dir = qtune::test::temp_dir("sdk-trainer");
  const auto throwing = copy_plugin("qtune_throwing", dir);
  const auto foreign = copy_plugin("qtune_foreign", dir);
  copy_plugin("qtune_int4", dir);
  const auto r = qtune::test::run_program(
      {qtune::test::bin_path("trainer"), "--list-plugins", "--plugin_dir", dir});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, (fs::path(dir) / "libqtune_int4.so").string())) << r.output;
  EXPECT_TRUE(contains(r.output, "plugin " + throwing + " (throwing): factory failed")) << r.output;
  EXPECT_TRUE(contains(r.output, "plugin " + foreign + " (foreign) refused")) << r.output;
  // The build's own plugins still load after the broken ones.
  for (const char* name : {"nf4", "hqq", "int8", "lora"})
    EXPECT_TRUE(contains(r.output, std::string("libqtune_") + name + ".so")) << name;
}

TEST(SdkRegistry, AShadowedPluginIsReportedNamingBothFiles) {
  const auto first = copy_plugin("qtune_int4", qtune::test::temp_dir("sdk-shadow-first"));
  const auto second = copy_plugin("qtune_int4", qtune::test::temp_dir("sdk-shadow-second"));
  qtune::Registry registry;
  registry.scan({fs::path(first).parent_path().string(), fs::path(second).parent_path().string()});
  ASSERT_EQ(registry.plugins().size(), 1u);
  EXPECT_EQ(registry.plugins()[0].path, first);
  ASSERT_EQ(registry.shadowed().size(), 1u);
  EXPECT_EQ(registry.shadowed()[0], "quant plugin int4 in " + second + " is shadowed by " + first +
                                        ", found earlier in the search path; it is not used");
  // The same file reached twice hides nothing.
  registry.load_library(first);
  EXPECT_EQ(registry.shadowed().size(), 1u);
}

TEST(SdkRegistry, TrainerListsOptionsAndShadowing) {
  const auto first = copy_plugin("qtune_int4", qtune::test::temp_dir("sdk-list-first"));
  const auto second = copy_plugin("qtune_int4", qtune::test::temp_dir("sdk-list-second"));
  const auto r =
      qtune::test::run_program({qtune::test::bin_path("trainer"), "--list-plugins", "--plugin_dir",
                                fs::path(first).parent_path().string()},
                               {"QTUNE_PLUGIN_PATH=" + fs::path(second).parent_path().string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "quant    int4       1.0.0      " + first + "\n")) << r.output;
  // Each option with its default, its declared range and its help.
  EXPECT_TRUE(contains(r.output,
                       "    group_size = 64              an integer in [0, 1073741824]  "
                       "input columns sharing one scale"))
      << r.output;
  EXPECT_TRUE(contains(r.output, "    block_size = 64              an integer in [32, 4096]"))
      << r.output;  // nf4, from the build's plugin folder
  EXPECT_TRUE(contains(r.output, "shadowed quant plugin int4 in " + second + " is shadowed by " +
                                     first + ", found earlier in the search path"))
      << r.output;
}

// docs/writing-a-plugin.md's `qtune-quantize --model stories260K.bin ...`: a relative model path
// resolves as it does for trainer (working directory, $QTUNE_DATA, ../shared/data).
TEST(SdkPrograms, QuantizeFindsARelativeModelLikeTrainer) {
  const std::string data = qtune::test::data_path("stories260K.bin");
  const auto plugins = qtune::test::temp_dir("sdk-quantize-plugins");
  copy_plugin("qtune_int4", plugins);
  const auto out = qtune::test::temp_dir("sdk-quantize") + "/int4-model";
  const auto r = qtune::test::run_program(
      {qtune::test::bin_path("qtune-quantize"), "--model", "stories260K.bin", "--quant", "int4",
       "--plugin_dir", plugins, "--out", out},
      {"QTUNE_DATA=" + fs::path(data).parent_path().string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(out + "/model.safetensors")) << r.output;
  const auto bad = qtune::test::run_program({qtune::test::bin_path("qtune-quantize"), "--model",
                                             "no-such-model.bin", "--quant", "int4", "--plugin_dir",
                                             plugins, "--out", out + "2"});
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  EXPECT_TRUE(contains(bad.output, "--model: file not found: no-such-model.bin")) << bad.output;
}
