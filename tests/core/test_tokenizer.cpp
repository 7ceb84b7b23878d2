// Tokenizers: llama2.c tok*.bin against a literal transcription of run.c's encode(), hand-derived
// expectations on tok512.bin, round trips on TinyStories, and sentencepiece (.model) vs llama2.c
// (.bin) parity on the Llama 2 tokenizer.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "qtune/error.h"
#include "qtune/tokenizer.h"
#include "test_util.h"

namespace qtune {
namespace {

// ---- an independent reference: run.c's encode(), transcribed step by step -------------------

struct RefVocab {
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::map<std::string, int> sorted;  // run.c: qsort + bsearch by strcmp
};

RefVocab read_ref_vocab(const std::string& path) {
  std::string d = test::read_file(path);
  RefVocab v;
  size_t pos = 4;
  while (pos < d.size()) {
    float s;
    int32_t len;
    std::memcpy(&s, d.data() + pos, 4);
    std::memcpy(&len, d.data() + pos + 4, 4);
    pos += 8;
    v.pieces.emplace_back(d.data() + pos, len);
    v.scores.push_back(s);
    pos += len;
  }
  for (size_t i = 0; i < v.pieces.size(); ++i) v.sorted.emplace(v.pieces[i], static_cast<int>(i));
  return v;
}

int ref_lookup(const RefVocab& v, const std::string& s) {
  auto it = v.sorted.find(s);
  return it == v.sorted.end() ? -1 : it->second;
}

std::vector<int> run_c_encode(const RefVocab& v, const std::string& text, bool bos, bool eos) {
  std::vector<int> tokens;
  if (bos) tokens.push_back(1);
  if (!text.empty()) tokens.push_back(ref_lookup(v, " "));
  std::string buf;
  for (size_t c = 0; c < text.size(); ++c) {
    if ((text[c] & 0xC0) != 0x80) buf.clear();
    buf += text[c];
    char next = c + 1 < text.size() ? text[c + 1] : '\0';
    if ((next & 0xC0) == 0x80 && buf.size() < 4) continue;
    int id = ref_lookup(v, buf);
    if (id != -1) {
      tokens.push_back(id);
    } else {
      for (unsigned char b : buf) tokens.push_back(b + 3);
    }
    buf.clear();
  }
  while (true) {
    float best_score = -1e10f;
    int best_id = -1, best_idx = -1;
    for (size_t i = 0; i + 1 < tokens.size(); ++i) {
      int id = ref_lookup(v, v.pieces[tokens[i]] + v.pieces[tokens[i + 1]]);
      if (id != -1 && v.scores[id] > best_score) {
        best_score = v.scores[id];
        best_id = id;
        best_idx = static_cast<int>(i);
      }
    }
    if (best_idx == -1) break;
    tokens[best_idx] = best_id;
    tokens.erase(tokens.begin() + best_idx + 1);
  }
  if (eos) tokens.push_back(2);
  return tokens;
}

std::vector<std::string> read_lines(const std::string& path, size_t max_lines, bool skip_empty) {
  std::ifstream in(path);
  std::vector<std::string> out;
  std::string line;
  while (out.size() < max_lines && std::getline(in, line))
    if (!skip_empty || !line.empty()) out.push_back(line);
  return out;
}

// ---- tok512.bin ----------------------------------------------------------------------------

TEST(Llama2cTokenizer, Tok512Basics) {
  auto tok = load_tokenizer(test::data_path("tok512.bin"));
  EXPECT_EQ(tok->vocab_size(), 512);  // derived from the file size, not given
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_TRUE(tok->encode("", false, false).empty());
  EXPECT_EQ(tok->encode("", true, true), (std::vector<int>{1, 2}));
}

// Expectations derived by hand from tok512.bin's pieces and scores (dumped with a 10-line Python
// reader of the format): " "=410 (-151), "t"=413, "h"=415, "e"=411, "c"=429, "a"=412,
// " t"=259 (score -0), "he"=260 (-1), " the"=265 (-6), " th"=308 (-49), " c"=280 (-21),
// "at"=294 (-35), "é"=485; no pieces "th", "ca", " ca", " cat", " é", " \n", "\n", "中".
TEST(Llama2cTokenizer, Tok512HandDerived) {
  auto tok = load_tokenizer(test::data_path("tok512.bin"));
  // " the": [" ","t","h","e"] -> " t" (-0) beats "he" (-1) -> [" t","h","e"] -> "he" (-1) beats
  // " th" (-49) -> [" t","he"] -> " the".
  EXPECT_EQ(tok->encode("the", false, false), (std::vector<int>{265}));
  EXPECT_EQ(tok->encode("the", true, true), (std::vector<int>{1, 265, 2}));
  // "cat": " c" (-21) first, then "at" (-35); " cat" is no piece.
  EXPECT_EQ(tok->encode("cat", false, false), (std::vector<int>{280, 294}));
  // A two-byte codepoint that is a piece stays whole; " é" is no piece.
  EXPECT_EQ(tok->encode("\xC3\xA9", false, false), (std::vector<int>{410, 485}));
  // Byte fallback: "\n" is no piece -> <0x0A> = 10 + 3; "中" (E4 B8 AD) -> three byte tokens.
  EXPECT_EQ(tok->encode("\n", false, false), (std::vector<int>{410, 13}));
  EXPECT_EQ(tok->encode("\xE4\xB8\xAD", false, false),
            (std::vector<int>{410, 0xE4 + 3, 0xB8 + 3, 0xAD + 3}));

  // decode: the leading space of a piece is dropped right after BOS only; byte pieces -> bytes.
  EXPECT_EQ(tok->decode_token(1, 265), "the");
  EXPECT_EQ(tok->decode_token(265, 265), " the");
  EXPECT_EQ(tok->decode_token(265, 13), "\n");
  EXPECT_EQ(tok->decode_token(1, 410), "");
  EXPECT_EQ(tok->decode({1, 410, 0xE4 + 3, 0xB8 + 3, 0xAD + 3, 2}), "\xE4\xB8\xAD");
  EXPECT_THROW(tok->decode_token(1, 512), UserError);
}

TEST(Llama2cTokenizer, Tok512MatchesRunCAndRoundTrips) {
  const std::string path = test::data_path("tok512.bin");
  auto tok = load_tokenizer(path);
  RefVocab ref = read_ref_vocab(path);
  auto lines = read_lines(test::data_path("tinystories_val_head.txt"), 400, false);
  size_t tokens = 0, non_ascii = 0;
  for (const auto& line : lines) {
    auto ids = tok->encode(line, true, false);
    ASSERT_EQ(ids, run_c_encode(ref, line, true, false)) << "line: " << line;
    EXPECT_EQ(tok->decode(ids), line);
    tokens += ids.size();
    for (unsigned char c : line) non_ascii += c >= 0x80;
  }
  EXPECT_GT(tokens, 10000u);
  // A whole story (long input, many merges) also matches and round trips.
  std::string story;
  for (size_t i = 0; i < 12; ++i) story += lines[i] + "\n";
  auto ids = tok->encode(story, true, true);
  EXPECT_EQ(ids, run_c_encode(ref, story, true, true));
  EXPECT_EQ(tok->decode(ids), story);
}

TEST(Llama2cTokenizer, MalformedFiles) {
  const std::string dir = test::temp_dir("tok");
  auto write = [&](const std::string& name, const std::string& bytes) {
    std::ofstream(dir + "/" + name, std::ios::binary) << bytes;
    return dir + "/" + name;
  };
  auto expect_error = [](const std::string& path, const std::string& needle) {
    try {
      load_tokenizer(path);
      ADD_FAILURE() << "no error for " << path;
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  };
  expect_error(dir + "/missing.bin", "does not exist");
  expect_error(write("x.txt", "abc"), "unknown kind");
  expect_error(write("short.bin", "ab"), "too short");
  // A valid file cut inside an entry.
  std::string good = test::read_file(test::data_path("tok512.bin"));
  expect_error(write("cut.bin", good.substr(0, good.size() - 3)), "truncated");
  expect_error(write("bad.model", "not a sentencepiece model"), "cannot load sentencepiece model");
}

// ---- sentencepiece vs llama2.c export of the same Llama 2 tokenizer --------------------------

TEST(SentencePieceTokenizer, Llama2Basics) {
  auto sp = load_tokenizer(test::data_path("llama2_tokenizer.model"));
  EXPECT_EQ(sp->vocab_size(), 32000);
  EXPECT_EQ(sp->bos_id(), 1);
  EXPECT_EQ(sp->eos_id(), 2);
  auto ids = sp->encode("Hello world", true, true);
  ASSERT_GE(ids.size(), 4u);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(ids.back(), 2);
  EXPECT_EQ(sp->decode(ids), "Hello world");
  EXPECT_EQ(sp->decode_token(1, ids[1]), "Hello");
  EXPECT_EQ(sp->decode_token(5, ids[1]), " Hello");
  // Byte fallback: a codepoint outside the vocabulary decodes to its raw bytes again.
  const std::string rare = "\xF0\x9F\xA6\x99 x";  // U+1F999
  EXPECT_EQ(sp->decode(sp->encode(rare, true, false)), rare);
}

// The Llama 2 tokenizer in both formats must give the same ids: run.c's greedy highest-score
// merge is sentencepiece's BPE, the dummy prefix is sentencepiece's add_dummy_prefix, and byte
// fallback is the same. Checked on every non-empty line of the first 300 of each text file, and
// on whole multi-line paragraphs.
TEST(SentencePieceTokenizer, ParityWithLlama2cExport) {
  auto sp = load_tokenizer(test::data_path("llama2_tokenizer.model"));
  auto bin = load_tokenizer(test::data_path("llama2_tokenizer.bin"));
  ASSERT_EQ(sp->vocab_size(), bin->vocab_size());
  size_t lines_checked = 0, tokens = 0;
  for (const char* file : {"tinyshakespeare.txt", "tinystories_val_head.txt"}) {
    auto lines = read_lines(test::data_path(file), 300, true);
    std::string paragraph;
    for (const auto& line : lines) {
      auto a = sp->encode(line, true, true);
      auto b = bin->encode(line, true, true);
      ASSERT_EQ(a, b) << file << ": " << line;
      EXPECT_EQ(sp->decode(a), line);
      EXPECT_EQ(bin->decode(b), line);
      ++lines_checked;
      tokens += a.size();
      paragraph += line + "\n";
    }
    EXPECT_EQ(sp->encode(paragraph, true, false), bin->encode(paragraph, true, false)) << file;
  }
  EXPECT_EQ(lines_checked, 600u);
  EXPECT_GT(tokens, 8000u);
}

}  // namespace
}  // namespace qtune
