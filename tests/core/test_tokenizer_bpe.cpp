// BPE tokenizers: the published token ids of Llama 3 (tiktoken tokenizer.model) and GPT-2
// (vocab.json + merges.txt) from ../shared/data/SOURCES.md, round trips on real text, the
// tokenizer.json writer read back (and checked against libsentencepiece for the Llama 2 model),
// the tokenizer.json features on small hand-written files, tokenizer_config.json, malformed files
// and hostile text.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qtune/error.h"
#include "qtune/tokenizer.h"
#include "test_util.h"

namespace fs = std::filesystem;
using Json = nlohmann::json;
using Ids = std::vector<int>;

namespace qtune {
namespace {

std::string write_file(const std::string& path, const std::string& bytes) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

// Lines of the two real text files (every `step`-th), and both files joined.
std::vector<std::string> sample_lines(size_t step) {
  std::vector<std::string> out;
  for (const char* f : {"tinyshakespeare.txt", "tinystories_val_head.txt"}) {
    std::istringstream in(test::read_file(test::data_path(f)));
    std::string line;
    for (size_t i = 0; std::getline(in, line); ++i)
      if (i % step == 0) out.push_back(line);
  }
  return out;
}
std::string real_text() {
  return test::read_file(test::data_path("tinyshakespeare.txt")) +
         test::read_file(test::data_path("tinystories_val_head.txt"));
}

// Message of the UserError `f` throws ("" and a test failure when it throws none).
using qtune::test::error_of;
#define EXPECT_CONTAINS(hay, needle) \
  EXPECT_NE(std::string(hay).find(needle), std::string::npos) << "message: " << (hay)

// ---- Llama 3 (tiktoken ranks) -----------------------------------------------------------------

TEST(TiktokenTokenizer, Llama3PublishedIds) {
  auto t = load_tokenizer(test::data_path("llama3_tokenizer.model"));
  EXPECT_EQ(t->vocab_size(), 128256);
  EXPECT_EQ(t->bos_id(), 128000);
  EXPECT_EQ(t->eos_id(), 128001);
  // meta-llama/llama3 llama/test_tokenizer.py
  EXPECT_EQ(t->encode("This is a test sentence.", true, true),
            (Ids{128000, 2028, 374, 264, 1296, 11914, 13, 128001}));
  EXPECT_EQ(t->encode("user", false, false), (Ids{882}));
  EXPECT_EQ(t->encode("system", false, false), (Ids{9125}));
  EXPECT_EQ(t->encode("assistant", false, false), (Ids{78191}));
  EXPECT_EQ(t->encode("\n\n", false, false), (Ids{271}));
  EXPECT_EQ(t->encode("This is a response.", false, false), (Ids{2028, 374, 264, 2077, 13}));
  // openai/tiktoken tests/test_encoding.py (cl100k_base agrees with Llama 3 on these)
  EXPECT_EQ(t->encode("hello world", false, false), (Ids{15339, 1917}));
  EXPECT_EQ(t->encode("rer", false, false), (Ids{38149}));
  EXPECT_EQ(t->encode("'rer", false, false), (Ids{2351, 81}));
  EXPECT_EQ(t->encode("today\n \n", false, false), (Ids{31213, 27907}));
  EXPECT_EQ(t->encode("today\n  \n", false, false), (Ids{31213, 14211}));
  EXPECT_EQ(t->encode("\xF0\x9F\x91\x8D", false, false), (Ids{9468, 239, 235}));  // 👍
  EXPECT_EQ(t->encode("Hello world", false, false), (Ids{9906, 1917}));
  // Special tokens at 128000.. are split out of the text: the rendered Llama-3-Instruct example
  // of chat_templates.json is Meta's test_encode_dialog ids.
  const Json templates = Json::parse(test::read_file(test::data_path("chat_templates.json")));
  const std::string rendered =
      templates["templates"]["meta-llama/Meta-Llama-3-8B-Instruct"]["example"]["rendered"];
  EXPECT_EQ(t->encode(rendered, false, false),
            (Ids{128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
                 128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191,
                 128007, 271}));
  EXPECT_EQ(t->token_to_id("<|start_header_id|>"), 128006);
  EXPECT_EQ(t->token_to_id("<|end_header_id|>"), 128007);
  EXPECT_EQ(t->token_to_id("<|reserved_special_token_4|>"), 128008);
  EXPECT_EQ(t->token_to_id("<|eot_id|>"), 128009);
  EXPECT_EQ(t->token_to_id("<|reserved_special_token_5|>"), 128010);
  EXPECT_EQ(t->token_to_id("<|reserved_special_token_250|>"), 128255);
  EXPECT_TRUE(t->is_special(128009));
  EXPECT_FALSE(t->is_special(882));
  EXPECT_EQ(t->decode_token(128006, 128009), "<|eot_id|>");
  EXPECT_EQ(t->config().bos_token, "<|begin_of_text|>");
  EXPECT_TRUE(t->config().add_bos_token);
  EXPECT_THROW(t->decode_token(-1, 128256), UserError);
}

// ---- GPT-2 (vocab.json + merges.txt) ----------------------------------------------------------

TEST(Gpt2Tokenizer, PublishedIds) {
  auto t = load_tokenizer(test::data_path("gpt2_vocab.json"));
  EXPECT_EQ(t->vocab_size(), 50257);
  EXPECT_EQ(t->eos_id(), 50256);
  EXPECT_FALSE(t->config().add_bos_token);
  // transformers GPT2Tokenizer docstring
  EXPECT_EQ(t->encode("Hello world", false, false), (Ids{15496, 995}));
  EXPECT_EQ(t->encode(" Hello world", false, false), (Ids{18435, 995}));
  // openai/tiktoken tests/test_encoding.py (gpt2)
  EXPECT_EQ(t->encode("hello world", false, false), (Ids{31373, 995}));
  EXPECT_EQ(t->encode("hello <|endoftext|>", false, false), (Ids{31373, 220, 50256}));
  const std::vector<std::pair<std::string, Ids>> zeros = {
      {"0", {15}},
      {"00", {405}},
      {"000", {830}},
      {"0000", {2388}},
      {"00000", {20483}},
      {"000000", {10535}},
      {"0000000", {24598}},
      {"00000000", {8269}},
      {"000000000", {10535, 830}},
      {"0000000000", {8269, 405}},
      {"0000000000000000", {25645}},
      {"00000000000000000", {8269, 10535, 830}}};
  for (const auto& [text, ids] : zeros) EXPECT_EQ(t->encode(text, false, false), ids) << text;
  EXPECT_EQ(t->token_to_id("\xC4\xA0the"), 262);  // "Ġthe", as vocab.json spells it
  EXPECT_EQ(t->decode_token(-1, 262), " the");
}

// ---- round trips on real text ------------------------------------------------------------------

TEST(BpeTokenizer, RoundTripsOnRealText) {
  const std::string text = real_text();
  for (const char* f : {"llama3_tokenizer.model", "gpt2_vocab.json"}) {
    auto t = load_tokenizer(test::data_path(f));
    const Ids ids = t->encode(text, false, false);
    EXPECT_GT(ids.size(), text.size() / 5) << f;
    EXPECT_EQ(t->decode(ids), text) << f;
    // Byte-level BPE reproduces any bytes: invalid UTF-8, NUL, control characters.
    const std::string odd = std::string("a\xFF\xFE b\0c\x01\r\n\xE4\xB8", 12) + "\xC3(\xF0\x9F";
    EXPECT_EQ(t->decode(t->encode(odd, false, false)), odd) << f;
  }
}

// ---- tokenizer.json written from each format and read back -------------------------------------

// Every format writes a tokenizer.json that our tokenizer.json reader turns into the same ids,
// and the sentencepiece-style one (merges derived from the scores, byte fallback) matches
// libsentencepiece itself on the Llama 2 model.
TEST(TokenizerJson, WrittenFromEachFormatGivesTheSameIds) {
  const auto lines = sample_lines(40);
  const std::string text = real_text().substr(0, 400000);
  for (const char* f : {"tok512.bin", "llama2_tokenizer.model", "llama3_tokenizer.model",
                        "gpt2_vocab.json"}) {
    auto src = load_tokenizer(test::data_path(f));
    const std::string dir = test::temp_dir("tokjson");
    save_hf_tokenizer(*src, dir);
    auto back = load_tokenizer(dir + "/tokenizer.json");
    EXPECT_EQ(back->vocab_size(), src->vocab_size()) << f;
    EXPECT_EQ(back->bos_id(), src->bos_id()) << f;
    EXPECT_EQ(back->eos_id(), src->eos_id()) << f;
    EXPECT_EQ(back->config().add_bos_token, src->config().add_bos_token) << f;
    size_t checked = 0;
    for (const auto& line : lines) {
      const Ids a = src->encode(line, true, false);
      ASSERT_EQ(back->encode(line, true, false), a) << f << ": " << line;
      EXPECT_EQ(back->decode(a), line) << f;
      ++checked;
    }
    EXPECT_GT(checked, 1000u);
    EXPECT_EQ(back->encode(text, true, true), src->encode(text, true, true)) << f;
    const Json cfg = Json::parse(test::read_file(dir + "/tokenizer_config.json"));
    EXPECT_EQ(cfg["tokenizer_class"], "PreTrainedTokenizerFast");
    EXPECT_EQ(back->token_to_id(cfg["eos_token"].get<std::string>()), src->eos_id()) << f;
  }
}

// ---- tokenizer.json features on small files ----------------------------------------------------

// A sentencepiece-style vocabulary: ▁ pieces, byte tokens, <unk>, and merges.
Json small_spm_json() {
  Json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  const std::vector<std::string> extra = {"\xE2\x96\x81", "h", "i", "\xE2\x96\x81h", "\xE2\x96\x81hi", "x"};
  for (size_t k = 0; k < extra.size(); ++k) vocab[extra[k]] = static_cast<int>(259 + k);
  Json added = Json::array();
  for (auto [id, s] : std::vector<std::pair<int, std::string>>{{0, "<unk>"}, {1, "<s>"}, {2, "</s>"}})
    added.push_back({{"id", id}, {"content", s}, {"special", true}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"single_word", false}});
  return {{"version", "1.0"},
          {"added_tokens", added},
          {"normalizer",
           {{"type", "Sequence"},
            {"normalizers",
             {{{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}},
              {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xE2\x96\x81"}}}}}},
          {"pre_tokenizer", nullptr},
          {"post_processor",
           {{"type", "TemplateProcessing"},
            {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
            {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
          {"decoder",
           {{"type", "Sequence"},
            {"decoders",
             {{{"type", "Replace"}, {"pattern", {{"String", "\xE2\x96\x81"}}}, {"content", " "}},
              {{"type", "ByteFallback"}},
              {{"type", "Fuse"}},
              {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
          {"model",
           {{"type", "BPE"},
            {"unk_token", "<unk>"},
            {"byte_fallback", true},
            {"fuse_unk", true},
            {"vocab", vocab},
            {"merges", {"\xE2\x96\x81 h", "\xE2\x96\x81h i"}}}}};
}

TEST(TokenizerJson, SentencepieceStyleByteFallbackAndAddedTokens) {
  const std::string dir = test::temp_dir("tokspm");
  Json j = small_spm_json();
  auto t = load_tokenizer(write_file(dir + "/a/tokenizer.json", j.dump()));
  EXPECT_EQ(t->bos_id(), 1);  // from the TemplateProcessing post-processor
  EXPECT_EQ(t->eos_id(), 2);  // "</s>"
  EXPECT_TRUE(t->config().add_bos_token);
  // "hi hi": ▁hi ▁hi by the two merges (ranks 0 then 1).
  EXPECT_EQ(t->encode("hi hi", true, false), (Ids{1, 263, 263}));
  // "é" is no piece: its two UTF-8 bytes as <0xC3> <0xA9>; decoded back to the character.
  EXPECT_EQ(t->encode("x\xC3\xA9", false, false), (Ids{259, 264, 3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(t->decode(t->encode("hi x\xC3\xA9 hi", true, false)), "hi x\xC3\xA9 hi");
  // Added tokens are split out before normalization; each segment gets its own ▁.
  EXPECT_EQ(t->encode("hi</s>hi", false, false), (Ids{263, 2, 263}));
  EXPECT_TRUE(t->is_special(2));
  EXPECT_EQ(t->token_to_id("\xE2\x96\x81hi"), 263);

  // Merges in the [left, right] list form give the same ids.
  j["model"]["merges"] = Json::array({Json::array({"\xE2\x96\x81", "h"}),
                                      Json::array({"\xE2\x96\x81h", "i"})});
  auto list_form = load_tokenizer(write_file(dir + "/b/tokenizer.json", j.dump()));
  EXPECT_EQ(list_form->encode("hi hi", true, false), (Ids{1, 263, 263}));

  // Without byte fallback unknown characters become <unk>, consecutive ones fused.
  j["model"]["byte_fallback"] = false;
  auto unk = load_tokenizer(write_file(dir + "/c/tokenizer.json", j.dump()));
  EXPECT_EQ(unk->encode("x\xC3\xA9\xC3\xA9x", false, false), (Ids{259, 264, 0, 264}));

  // lstrip/rstrip added tokens swallow the whitespace beside them; a non-special one is not
  // reported special.
  j["added_tokens"].push_back({{"id", 264}, {"content", "x"}, {"special", false},
                               {"lstrip", true}, {"rstrip", true}});
  auto strip = load_tokenizer(write_file(dir + "/d/tokenizer.json", j.dump()));
  EXPECT_EQ(strip->encode("hi  x  hi", false, false), (Ids{263, 264, 263}));
  EXPECT_FALSE(strip->is_special(264));

  // Metaspace pre-tokenizer instead of the normalizer: prepend_scheme "first" gives the ▁ only
  // to the text before the first added token.
  j = small_spm_json();
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"},
                        {"prepend_scheme", "first"}, {"split", true}};
  auto meta = load_tokenizer(write_file(dir + "/e/tokenizer.json", j.dump()));
  EXPECT_EQ(meta->encode("hi hi</s>hi", false, false), (Ids{263, 263, 2, 260, 261}));
  j["pre_tokenizer"]["prepend_scheme"] = "always";
  auto always = load_tokenizer(write_file(dir + "/f/tokenizer.json", j.dump()));
  EXPECT_EQ(always->encode("hi</s>hi", false, false), (Ids{263, 2, 263}));
}

// A byte-level file with its own Split regex (Llama 3 style) and ignore_merges.
TEST(TokenizerJson, ByteLevelSplitRegexAndDigits) {
  Json vocab = Json::object();
  auto gpt2_char = [](int b) {  // bytes_to_unicode for the bytes used here
    std::string s;
    if (b == ' ') return std::string("\xC4\xA0");  // Ġ
    s += static_cast<char>(b);
    return s;
  };
  // All 256 bytes are needed; give the non-printable ones their mapped characters.
  int next = 0;
  std::vector<int> order;
  for (int b = 0; b < 256; ++b) order.push_back(b);
  {
    int n = 0;
    for (int b : order) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const int cp = printable ? b : 256 + n++;
      std::string u;
      if (cp < 0x80) {
        u += static_cast<char>(cp);
      } else {
        u += static_cast<char>(0xC0 | (cp >> 6));
        u += static_cast<char>(0x80 | (cp & 0x3F));
      }
      vocab[u] = next++;
    }
  }
  vocab[gpt2_char('1') + "2"] = next++;          // 256: "12"
  vocab[gpt2_char(' ') + "a"] = next++;          // 257: "Ġa"
  vocab[gpt2_char(' ') + "ab"] = next++;         // 258: "Ġab", reachable only as a whole word
  Json j = {{"added_tokens", Json::array()},
            {"normalizer", nullptr},
            {"pre_tokenizer",
             {{"type", "Sequence"},
              {"pretokenizers",
               {{{"type", "Digits"}, {"individual_digits", false}},
                {{"type", "Split"}, {"pattern", {{"Regex", " ?[a-z]+| ?[0-9]+|\\s+"}}},
                 {"behavior", "Isolated"}, {"invert", false}},
                {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}}},
            {"decoder", {{"type", "ByteLevel"}}},
            {"model",
             {{"type", "BPE"}, {"ignore_merges", true}, {"vocab", vocab},
              {"merges", {"1 2", "\xC4\xA0 a"}}}}};
  const std::string dir = test::temp_dir("tokbl");
  auto t = load_tokenizer(write_file(dir + "/tokenizer.json", j.dump()));
  // " ab" is a vocabulary word: ignore_merges takes it whole although no merge builds it.
  EXPECT_EQ(t->encode(" ab", false, false), (Ids{258}));
  EXPECT_EQ(t->encode(" a", false, false), (Ids{257}));
  EXPECT_EQ(t->encode("x123", false, false), (Ids{'x', 256, '3'}));
  EXPECT_EQ(t->bos_id(), -1);  // no BOS anywhere: encode(bos=true) adds nothing
  EXPECT_EQ(t->encode("a", true, false), (Ids{'a'}));
  EXPECT_NE(t->encode("e\xCC\x81", false, false), t->encode("\xC3\xA9", false, false));

  // Qwen2's NFC normalizer: "e" + combining acute is encoded as the composed "é".
  j["normalizer"] = {{"type", "NFC"}};
  auto nfc = load_tokenizer(write_file(dir + "/nfc/tokenizer.json", j.dump()));
  EXPECT_EQ(nfc->encode("e\xCC\x81", false, false), nfc->encode("\xC3\xA9", false, false));
  EXPECT_EQ(nfc->encode("e\xCC\x81", false, false), (Ids{0xC3, 0xA9}));
}

// ---- tokenizer_config.json ---------------------------------------------------------------------

TEST(TokenizerConfig, TokensFlagsAndChatTemplate) {
  const Json templates = Json::parse(test::read_file(test::data_path("chat_templates.json")));
  const Json& tiny = templates["templates"]["TinyLlama/TinyLlama-1.1B-Chat-v1.0"];
  const std::string dir = test::temp_dir("tokcfg");
  const std::string tj = write_file(dir + "/tokenizer.json", small_spm_json().dump());
  // AddedToken-object form for bos, string form for eos, as transformers writes both.
  Json cfg = {{"bos_token", {{"__type", "AddedToken"}, {"content", tiny["bos_token"]},
                             {"lstrip", false}, {"normalized", false}}},
              {"eos_token", tiny["eos_token"]},
              {"pad_token", "</s>"},
              {"unk_token", "<unk>"},
              {"add_bos_token", false},
              {"add_eos_token", true},
              {"chat_template", tiny["chat_template"]}};
  write_file(dir + "/tokenizer_config.json", cfg.dump());
  auto t = load_tokenizer(tj);
  EXPECT_EQ(t->config().path, dir + "/tokenizer_config.json");
  EXPECT_EQ(t->config().bos_token, "<s>");
  EXPECT_EQ(t->config().eos_token, "</s>");
  EXPECT_EQ(t->config().pad_token, "</s>");
  EXPECT_EQ(t->config().pad_id, 2);
  EXPECT_FALSE(t->config().add_bos_token);
  EXPECT_TRUE(t->config().add_eos_token);
  EXPECT_EQ(t->config().chat_template, tiny["chat_template"].get<std::string>());
  EXPECT_EQ(t->bos_id(), 1);

  // The list form of chat_template: the entry named "default".
  cfg["chat_template"] = {{{"name", "tool_use"}, {"template", "T"}}, {{"name", "default"}, {"template", "D"}}};
  // A null bos_token means no BOS; eos may name an added token.
  cfg["bos_token"] = nullptr;
  write_file(dir + "/tokenizer_config.json", cfg.dump());
  t = load_tokenizer(tj);
  EXPECT_EQ(t->config().chat_template, "D");
  EXPECT_EQ(t->bos_id(), -1);

  // The config also applies to sentencepiece / llama2.c files beside it (ids stay the model's).
  const std::string bin = dir + "/tok512.bin";
  fs::copy_file(test::data_path("tok512.bin"), bin);
  cfg["chat_template"] = "C";
  write_file(dir + "/tokenizer_config.json", cfg.dump());
  auto l2c = load_tokenizer(bin);
  EXPECT_EQ(l2c->config().chat_template, "C");
  EXPECT_EQ(l2c->config().pad_id, 2);
  EXPECT_EQ(l2c->bos_id(), 1);

  // Wrong types and unknown tokens name the file and the key.
  const std::string cfg_path = dir + "/tokenizer_config.json";
  for (const auto& [bad, needle] : std::vector<std::pair<Json, std::string>>{
           {{{"add_bos_token", "yes"}}, "\"add_bos_token\" must be true or false"},
           {{{"bos_token", 5}}, "\"bos_token\" must be a string, null or an AddedToken object"},
           {{{"chat_template", 3}}, "\"chat_template\" must be a string or a list"},
           {{{"chat_template", {{{"name", "x"}, {"template", "y"}}}}}, "without an entry named \"default\""},
           {{{"eos_token", "<|im_end|>"}}, "eos_token \"<|im_end|>\" is not a token of"}}) {
    write_file(cfg_path, bad.dump());
    const std::string msg = error_of([&] { load_tokenizer(tj); });
    EXPECT_CONTAINS(msg, needle);
    EXPECT_CONTAINS(msg, cfg_path);
  }
  write_file(cfg_path, "{not json");
  EXPECT_CONTAINS(error_of([&] { load_tokenizer(tj); }), cfg_path + ": not valid JSON");
}

// ---- malformed files ---------------------------------------------------------------------------

TEST(BpeTokenizer, MalformedFilesNameTheFileAndWhatWasExpected) {
  const std::string dir = test::temp_dir("tokbad");
  int n = 0;
  auto expect = [&](const std::string& name, const std::string& bytes, const std::string& needle) {
    const std::string path = write_file(dir + "/" + std::to_string(n++) + "/" + name, bytes);
    const std::string msg = error_of([&] { load_tokenizer(path); });
    EXPECT_CONTAINS(msg, needle);
    EXPECT_CONTAINS(msg, path);
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;  // one line
  };
  const Json good = small_spm_json();
  auto with = [&](const std::string& ptr, const Json& v) {
    Json j = good;
    j[Json::json_pointer(ptr)] = v;
    return j.dump();
  };
  expect("tokenizer.json", "{\"model\": ", "not valid JSON");
  expect("tokenizer.json", "[1, 2]", "expected a Hugging Face tokenizer.json");
  expect("tokenizer.json", with("/model/type", "Unigram"), "model.type \"Unigram\" is not supported");
  expect("tokenizer.json", with("/model/merges/0", "\xE2\x96\x81 q"), "\"q\" is not in model.vocab");
  expect("tokenizer.json", with("/model/merges/0", "a b c"), "must be \"left right\"");
  expect("tokenizer.json", with("/model/vocab/x", -4), "must be a token id in [0, 16777216)");
  expect("tokenizer.json", with("/model/vocab/x", 5), "gives id 5 to both");
  expect("tokenizer.json", with("/model/dropout", 0.1), "model.dropout must be null");
  expect("tokenizer.json", with("/pre_tokenizer", Json{{"type", "Whitespace"}}),
         "pre_tokenizer type \"Whitespace\" is not supported");
  expect("tokenizer.json", with("/normalizer", Json{{"type", "Lowercase"}}),
         "normalizer type \"Lowercase\" is not supported");
  expect("tokenizer.json", with("/decoder", Json{{"type", "WordPiece"}}),
         "decoder type \"WordPiece\" is not supported");
  expect("tokenizer.json",
         with("/pre_tokenizer", Json{{"type", "Split"}, {"pattern", {{"Regex", "(a"}}},
                                     {"behavior", "Isolated"}}),
         "pre-tokenizer pattern does not compile");
  expect("tokenizer.json", with("/added_tokens/0/id", "zero"), "added_tokens[0].id must be a token id");
  expect("tokenizer.json", with("/model/unk_token", "<nope>"), "model.unk_token \"<nope>\" is not in model.vocab");
  // A byte-level vocabulary without all 256 bytes cannot encode arbitrary text.
  expect("tokenizer.json",
         Json{{"pre_tokenizer", {{"type", "ByteLevel"}}},
              {"model", {{"type", "BPE"}, {"vocab", {{"a", 0}}}, {"merges", Json::array()}}}}
             .dump(),
         "needs a token for every byte");
  // tiktoken
  expect("tokenizer.model", "IQ== 0\nIg== 1\n@@@ 2\n", "line 3 must be \"<base64 token> <rank>\"");
  expect("tokenizer.model", "IQ== 0\nIg== 5\n", "line 2 has rank \"5\", expected 1");
  expect("tokenizer.model", "IQ== 0\nIQ== 1\n", "line 2 repeats the token of rank 0");
  expect("x.tiktoken", "", "no \"<base64 token> <rank>\" lines");
  // GPT-2 vocab.json + merges.txt
  expect("vocab.json", "{\"a\": 0}", "needs its merges beside it");
  {
    const std::string d = dir + "/gpt2";
    write_file(d + "/merges.txt", "#version: 0.2\n\xC4\xA0 t\nabc\n");
    const std::string v = write_file(d + "/vocab.json", test::read_file(test::data_path("gpt2_vocab.json")));
    const std::string msg = error_of([&] { load_tokenizer(v); });
    EXPECT_CONTAINS(msg, d + "/merges.txt: line 3 must be two tokens separated by one space");
  }
  expect("tokenizer.txt", "abc", "unknown kind");
}

// ---- hostile text: bounded work --------------------------------------------------------------

// Long runs that make naive regexes or BPE loops quadratic: each encodes (in O(n log n)) and
// round trips. A pathological user pattern stops at PCRE2's match limit with an error instead
// of backtracking for hours.
TEST(BpeTokenizer, HostileTextIsBounded) {
  auto l3 = load_tokenizer(test::data_path("llama3_tokenizer.model"));
  auto g2 = load_tokenizer(test::data_path("gpt2_vocab.json"));
  const size_t n = 1 << 18;
  std::vector<std::string> texts = {std::string(n, ' '), std::string(n, ' ') + "a",
                                    std::string(n, 'a'), std::string(n, '7'),
                                    std::string(n / 2, '\n') + "x"};
  std::string s;
  while (s.size() < n) s += "'s \n\t\xE4\xB8\xAD\x01!";
  texts.push_back(s);
  for (const auto& text : texts)
    for (auto* t : {l3.get(), g2.get()}) {
      const Ids ids = t->encode(text, false, false);
      EXPECT_LE(ids.size(), text.size());
      EXPECT_EQ(t->decode(ids), text);
    }

  Json j = {{"pre_tokenizer", {{"type", "Sequence"},
                               {"pretokenizers",
                                {{{"type", "Split"}, {"pattern", {{"Regex", "(a+)+$"}}},
                                  {"behavior", "Isolated"}},
                                 {{"type", "ByteLevel"}, {"use_regex", false}}}}}},
            {"model", {{"type", "BPE"}, {"vocab", Json::object()}, {"merges", Json::array()}}}};
  // The 256 byte tokens (bytes_to_unicode) from the GPT-2 vocabulary: ids 0..255 there.
  const Json gv = Json::parse(test::read_file(test::data_path("gpt2_vocab.json")));
  for (auto it = gv.begin(); it != gv.end(); ++it)
    if (it.value().get<int>() < 256) j["model"]["vocab"][it.key()] = it.value();
  const std::string dir = test::temp_dir("tokhostile");
  const std::string path = write_file(dir + "/tokenizer.json", j.dump());
  auto bad = load_tokenizer(path);
  const std::string msg = error_of([&] { bad->encode(std::string(40, 'a') + "b", false, false); });
  EXPECT_CONTAINS(msg, "pre-tokenizer regex gave up");
  EXPECT_CONTAINS(msg, path);
}

}  // namespace
}  // namespace qtune
