// The conformance suite, tested: it must pass a correct backend and fail each deliberately broken
// variant of it (tests/sdk/kit_backend.cpp, built by tests/sdk/CMakeLists.txt, one folder per
// variant), with a message that names the check and the plugin and says what is wrong. It runs
// the built qtune_conformance as a plugin author does: QTUNE_PLUGIN_PATH and a --gtest_filter.
#include <gtest/gtest.h>

#include <filesystem>

#include "test_util.h"

namespace {

struct Verdict {
  int exit_code;
  std::string output;
};

Verdict conformance(const std::string& variant, const std::vector<std::string>& extra = {},
                    bool brief = true) {
  const std::string dir =
      (std::filesystem::path(QTUNE_SDK_TEST_PLUGIN_DIR) / ("kit_" + variant)).string();
  if (!std::filesystem::exists(dir + "/libqtune_kit_" + variant + ".so"))
    throw std::runtime_error("test plugin not built: " + dir);
  std::vector<std::string> args = {qtune::test::bin_path("qtune_conformance"),
                                   "--gtest_filter=*/kit_" + variant + "_*"};
  if (brief) args.push_back("--gtest_brief=1");
  args.insert(args.end(), extra.begin(), extra.end());
  auto r = qtune::test::run_program(args, {"QTUNE_PLUGIN_PATH=" + dir});
  return {r.exit_code, r.output};
}

bool has(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// The variant fails, and some failure line names `check`, the plugin and `phrase`.
void expect_caught(const std::string& variant, const std::string& check,
                   const std::string& phrase) {
  const Verdict v = conformance(variant);
  EXPECT_NE(v.exit_code, 0) << "the conformance suite passed the broken kit_" << variant
                            << " backend:\n"
                            << v.output;
  const std::string line = "conformance: FAIL check " + check;
  EXPECT_TRUE(has(v.output, line + "/kit_" + variant + "_default for plugin kit_" + variant))
      << "no failure line \"" << line << "...\" for kit_" << variant << ":\n"
      << v.output;
  EXPECT_TRUE(has(v.output, phrase)) << "the failure does not say \"" << phrase << "\":\n"
                                     << v.output;
}

}  // namespace

TEST(ConformanceCatches, PassesTheCorrectBackend) {
  const Verdict v = conformance("ok", {}, /*brief=*/false);
  EXPECT_EQ(v.exit_code, 0) << v.output;
  EXPECT_FALSE(has(v.output, "conformance: FAIL")) << v.output;
  EXPECT_FALSE(has(v.output, "[  SKIPPED ]")) << v.output;
  // Not vacuous: the derived and boundary sets (half, min, 0, max) ran, and printed their error.
  for (const char* set : {"default", "bits_4", "bits_3", "group_size_32", "group_size_128",
                          "group_size_0", "group_size_1048576"})
    EXPECT_TRUE(has(v.output, std::string("[       OK ] Plugins/Conformance.") +
                                  "GaussianRoundTripWithinDeclaredBound/kit_ok_" + set))
        << set << "\n"
        << v.output;
  EXPECT_TRUE(has(v.output, "[ bound    ] kit_ok {\"bits\":3,\"group_size\":64}: Gaussian"))
      << v.output;
}

TEST(ConformanceCatches, ExplicitOptionSetsRun) {
  const Verdict v = conformance(
      "ok", {"--quant_sets", "kit_ok:{\"bits\":5,\"group_size\":16}", "--gtest_list_tests"});
  EXPECT_EQ(v.exit_code, 0) << v.output;
  EXPECT_TRUE(has(v.output, "kit_ok_given1_bits_5_group_size_16")) << v.output;
  const Verdict bad = conformance("ok", {"--quant_sets", "kit_ok:{bits:5}"});
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  EXPECT_TRUE(has(bad.output, "--quant_sets: entry 'kit_ok:{bits:5}': the options are not valid"))
      << bad.output;
}

TEST(ConformanceCatches, AStateThatCopiesItsTensors) {
  expect_caught("copy_state", "StateIsTheWeightsOwnStorage",
                "state tensor \"weight\" (Char [256, 512], 131072 bytes) is a new copy on every "
                "call of state()");
}

TEST(ConformanceCatches, ALooseErrorBound) {
  expect_caught("loose_bound", "GaussianRoundTripWithinDeclaredBound",
                "declare a bound near what the backend achieves");
}

TEST(ConformanceCatches, AWrongLinearGradInput) {
  expect_caught("bad_grad", "LinearAndGradInputMatchDequantized",
                "linear_grad_input(g) must equal g @ dequantize()");
}

TEST(ConformanceCatches, ALoadThatAcceptsATruncatedTensor) {
  expect_caught("lax_load", "LoadRejectsCorruptStates",
                "load() accepted a state whose tensor \"weight.scale\" was truncated from Float "
                "[70, 3] to Float [69, 3]");
}

TEST(ConformanceCatches, QuantizingThatDependsOnTheThreadCount) {
  expect_caught("threads", "QuantizeIsDeterministic",
                "with 1 and with 3 intra-op threads (at::set_num_threads) gave different states");
}

TEST(ConformanceCatches, ARejectionThatIsNotAUserError) {
  // Only the odd-bits set is rejected, so the default set passes and bits_3 fails.
  const Verdict v = conformance("throw_options");
  EXPECT_NE(v.exit_code, 0) << v.output;
  EXPECT_TRUE(has(v.output, "for plugin kit_throw_options {\"bits\":3}")) << v.output;
  EXPECT_TRUE(has(v.output,
                  "with std::exception (not a qtune::UserError): odd bits; a rejected "
                  "option set must raise qtune::UserError"))
      << v.output;
}
