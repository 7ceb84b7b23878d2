// Internal to the tokenizer sources (not SDK): the PCRE2 pre-tokenizer regex, the BPE loaders
// load_tokenizer() dispatches to, the tokenizer_config.json reader, and the tokenizer.json writer
// for sentencepiece-style vocabularies (llama2.c .bin, sentencepiece .model).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "qtune/tokenizer.h"

struct pcre2_real_code_8;

namespace qtune::tok {

/// Largest tokenizer file read (vocabularies are a few MB; this bounds allocation on junk input).
constexpr int64_t kMaxTokenizerFileBytes = int64_t(1) << 30;
/// Largest token id accepted in any vocabulary file.
constexpr int64_t kMaxTokenId = int64_t(1) << 24;

/// A compiled PCRE2 pattern (UTF, Unicode properties, JIT when available) with a bounded amount
/// of work per match (match and heap limits): hostile text gives a UserError, never a hang.
class Regex {
 public:
  /// `literal`: match `pattern` as a plain string. `where` names the pattern in errors.
  Regex(const std::string& pattern, bool literal, const std::string& where);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  struct Piece {
    size_t begin, end;
    bool matched;
  };
  /// Appends to `out` consecutive pieces covering `text`: the matches and the gaps between them
  /// (HF's "Isolated" split; gaps only hold text no alternative matches, such as invalid UTF-8).
  /// Empty matches are skipped.
  void split(std::string_view text, std::vector<Piece>& out) const;
  const std::string& pattern() const { return pattern_; }

 private:
  std::string pattern_, where_;
  pcre2_real_code_8* code_ = nullptr;
};

/// The GPT-2 pre-tokenizer pattern (HF ByteLevel use_regex) and Llama 3's pat_str.
extern const char* const kGpt2Pattern;
extern const char* const kLlama3Pattern;

/// Length of the UTF-8 sequence starting at s[i] (1 for an invalid or truncated one).
size_t utf8_char_len(std::string_view s, size_t i);

/// tokenizer_config.json as read, with which keys were present (a null bos_token means "no BOS",
/// an absent one "the format's default").
struct ConfigFile {
  TokenizerConfig config;
  bool has_bos_token = false, has_eos_token = false, has_pad_token = false;
  bool has_add_bos_token = false, has_add_eos_token = false;
};
/// Reads `dir of tokenizer_path`/tokenizer_config.json when it exists (else defaults with
/// path ""). Validates the types of the keys it uses.
ConfigFile read_tokenizer_config(const std::string& tokenizer_path);

/// One entry of a sentencepiece-style vocabulary, for writing it as tokenizer.json.
struct SpmPiece {
  enum Kind { kNormal, kUnknown, kControl, kByte, kUserDefined };
  std::string text;  // with U+2581 for spaces
  float score = 0;
  Kind kind = kNormal;
};
/// tokenizer.json text for a sentencepiece BPE vocabulary with byte fallback (the layout
/// transformers writes for Llama 2 / TinyLlama / Mistral): Prepend+Replace normalizer, merges
/// from the scores (higher score merges first), byte tokens, control tokens as added tokens.
std::string spm_style_tokenizer_json(const std::vector<SpmPiece>& pieces, int bos_id,
                                     bool add_bos);

bool looks_like_tiktoken(const std::string& head);
std::unique_ptr<Tokenizer> load_hf_tokenizer_json(const std::string& path,
                                                  const ConfigFile& config);
std::unique_ptr<Tokenizer> load_gpt2_vocab_merges(const std::string& vocab_path,
                                                  const std::string& merges_path,
                                                  const ConfigFile& config);
std::unique_ptr<Tokenizer> load_tiktoken(const std::string& path, const ConfigFile& config);

/// The whole file, refusing files over kMaxTokenizerFileBytes (message names `what` and path).
std::string read_tokenizer_file(const std::string& path, const std::string& what);

}  // namespace qtune::tok
