// qtune-convert writes a tokenizer.json (+ tokenizer_config.json) beside the model and keeps the
// original tokenizer.model / tokenizer.bin; reading the written tokenizer.json back gives the
// source tokenizer's ids, and open_model() of the written directory finds a tokenizer. Also
// qtune-tokenize's flags.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "qtune/model_files.h"
#include "qtune/tokenizer.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace qtune {
namespace {

std::vector<std::string> text_lines(const char* file, size_t step) {
  std::istringstream in(test::read_file(test::data_path(file)));
  std::vector<std::string> out;
  std::string line;
  for (size_t i = 0; std::getline(in, line); ++i)
    if (i % step == 0) out.push_back(line);
  return out;
}

void expect_same_ids(const Tokenizer& a, const Tokenizer& b, const std::string& what) {
  size_t n = 0;
  for (const char* f : {"tinystories_val_head.txt", "tinyshakespeare.txt"})
    for (const auto& line : text_lines(f, 50)) {
      ASSERT_EQ(a.encode(line, true, true), b.encode(line, true, true)) << what << ": " << line;
      ++n;
    }
  EXPECT_GT(n, 300u);
}

test::RunResult convert(const std::vector<std::string>& args) {
  std::vector<std::string> cmd = {test::bin_path("qtune-convert")};
  cmd.insert(cmd.end(), args.begin(), args.end());
  return test::run_program(cmd);
}

TEST(TokenizerConvert, WritesTokenizerJsonAndKeepsTheOriginal) {
  const std::string root = test::temp_dir("tokconv");

  // llama2.c checkpoint: tok512.bin beside it is found, kept, and written as tokenizer.json.
  const std::string a = root + "/a";
  test::RunResult r = convert({"--model", test::data_path("stories260K.bin"), "--out", a});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("tokenizer.json + tokenizer_config.json from"), std::string::npos)
      << r.output;
  EXPECT_EQ(test::read_file(a + "/tokenizer.bin"), test::read_file(test::data_path("tok512.bin")));
  ASSERT_TRUE(fs::exists(a + "/tokenizer_config.json"));
  expect_same_ids(*load_tokenizer(test::data_path("tok512.bin")),
                  *load_tokenizer(a + "/tokenizer.json"), "tok512.bin");

  // Llama 3's tiktoken tokenizer.model: kept byte for byte (and still read as tiktoken), plus a
  // byte-level tokenizer.json with the same ids.
  const std::string b = root + "/b";
  r = convert({"--model", test::data_path("stories260K.bin"), "--tokenizer",
               test::data_path("llama3_tokenizer.model"), "--out", b});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(test::read_file(b + "/tokenizer.model"),
            test::read_file(test::data_path("llama3_tokenizer.model")));
  auto tiktoken = load_tokenizer(test::data_path("llama3_tokenizer.model"));
  auto json = load_tokenizer(b + "/tokenizer.json");
  expect_same_ids(*tiktoken, *json, "llama3 tokenizer.json");
  EXPECT_EQ(json->encode("<|start_header_id|>user<|end_header_id|>\n\n", false, false),
            (std::vector<int>{128006, 882, 128007, 271}));

  // An HF directory whose only tokenizer is tokenizer.json: open_model() finds it, and
  // converting that directory again writes the same tokenizer.json.
  fs::remove(b + "/tokenizer.model");
  ModelFiles files = open_model(b);
  EXPECT_EQ(fs::path(files.tokenizer_path).filename(), "tokenizer.json");
  const std::string c = root + "/c";
  r = convert({"--model", b, "--out", c, "--dtype", "bf16"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(test::read_file(c + "/tokenizer.json"), test::read_file(b + "/tokenizer.json"));
  EXPECT_FALSE(fs::exists(c + "/tokenizer.model"));

  // A file that is no tokenizer is refused with its name, before anything is reported written.
  r = convert({"--model", test::data_path("stories260K.bin"), "--tokenizer",
               test::data_path("SOURCES.md"), "--out", root + "/d"});
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("SOURCES.md: unknown kind"), std::string::npos) << r.output;
}

TEST(TokenizerApp, QtuneTokenizeWritesIdsAndReports) {
  const std::string dir = test::temp_dir("toktool");
  const std::string text = dir + "/t.txt", ids = dir + "/ids.txt";
  std::ofstream(text) << "This is a test sentence.";
  const std::string tool = test::bin_path("qtune-tokenize");
  test::RunResult r = test::run_program({tool, "--tokenizer", test::data_path("llama3_tokenizer.model"),
                                   "--text", text, "--bos", "--eos", "--ids-out", ids, "--repeat", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(test::read_file(ids), "128000 2028 374 264 1296 11914 13 128001\n");  // Meta's test
  EXPECT_NE(r.output.find("24 bytes -> 8 ids"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("fastest of 2); decode: identical to the text"), std::string::npos)
      << r.output;
  r = test::run_program({tool, "--tokenizer", test::data_path("gpt2_vocab.json"), "--text", text,
                         "--ids-out", ids});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::string expected;  // what the library gives, written by the tool
  for (int id : load_tokenizer(test::data_path("gpt2_vocab.json"))->encode("This is a test sentence.", false, false))
    expected += (expected.empty() ? "" : " ") + std::to_string(id);
  EXPECT_EQ(test::read_file(ids), expected + "\n");
  r = test::run_program({tool, "--tokenizer", test::data_path("gpt2_vocab.json"), "--text", text,
                         "--repeat", "0"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("--repeat must be >= 1, got 0"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace qtune
