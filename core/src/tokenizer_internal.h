// Internal to the tokenizer sources (not SDK): the PCRE2 pre-tokenizer regex, the BPE loaders
// load_tokenizer() dispatches to, the tokenizer_config.json reader, and the tokenizer.json writer
// for sentencepiece-style vocabularies (llama2.c .bin, sentencepiece .model).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <queue>
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

/// BPE's merge loop over the token ids `sym`, shared by llama2.c (by score) and the other BPE
/// formats (by rank): repeatedly merges the adjacent pair with the smallest key, leftmost on ties.
/// `pair(left_id, right_id, key, merged_id)` says whether a pair merges. Symbols sit in a linked
/// list and candidate pairs in a heap with lazy invalidation (a candidate whose sides changed is
/// dropped when it surfaces), which picks the same merge at every step as rescanning all pairs
/// would, in O(n log n).
template <typename Key, typename PairFn>
void merge_pairs(std::vector<int>& sym, PairFn&& pair) {
  const int n = static_cast<int>(sym.size());
  if (n < 2) return;
  std::vector<int> next(n), prev(n);
  for (int i = 0; i < n; ++i) {
    next[i] = i + 1 < n ? i + 1 : -1;
    prev[i] = i - 1;
  }
  struct Cand {
    Key key;
    int left, right, left_id, right_id, merged;
    bool operator<(const Cand& o) const {  // the heap's top: smallest key, then leftmost
      if (o.key < key) return true;
      if (key < o.key) return false;
      return left > o.left;
    }
  };
  std::priority_queue<Cand> q;
  auto consider = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    Key key;
    int merged;
    if (pair(sym[l], sym[r], key, merged)) q.push(Cand{key, l, r, sym[l], sym[r], merged});
  };
  for (int i = 0; i + 1 < n; ++i) consider(i, i + 1);
  std::vector<char> alive(n, 1);
  while (!q.empty()) {
    const Cand c = q.top();
    q.pop();
    if (!alive[c.left] || !alive[c.right] || next[c.left] != c.right ||
        sym[c.left] != c.left_id || sym[c.right] != c.right_id)
      continue;
    sym[c.left] = c.merged;
    alive[c.right] = 0;
    next[c.left] = next[c.right];
    if (next[c.right] >= 0) prev[next[c.right]] = c.left;
    consider(prev[c.left], c.left);
    consider(c.left, next[c.left]);
  }
  std::vector<int> out;
  for (int i = 0; i >= 0; i = next[i]) out.push_back(sym[i]);
  sym.swap(out);
}

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
