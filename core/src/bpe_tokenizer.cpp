// BPE tokenizers: Hugging Face tokenizer.json (byte-level BPE as in GPT-2 / Llama 3 / Qwen2, and
// sentencepiece-style BPE with byte fallback as in Llama 2 / TinyLlama / Mistral), GPT-2's
// vocab.json + merges.txt, and tiktoken rank files (Llama 3's original tokenizer.model). One
// BpeTokenizer runs the pipeline of HF tokenizers (huggingface/tokenizers, tokenizers/src:
// added-token split -> normalizer -> pre-tokenizer -> BPE model -> decoder); each loader fills
// it from its file. Also the tokenizer.json writer for sentencepiece-style vocabularies.
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <climits>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <queue>
#include <tuple>
#include <unordered_map>

#include "qtune/error.h"
#include "qtune/options.h"
#include "tokenizer_internal.h"

namespace fs = std::filesystem;

namespace qtune::tok {

std::string read_tokenizer_file(const std::string& path, const std::string& what) {
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  QTUNE_CHECK(!ec, "cannot read ", what, " ", path, " (", ec.message(), ")");
  QTUNE_CHECK(static_cast<int64_t>(size) <= kMaxTokenizerFileBytes, what, " ", path, " is ", size,
              " bytes, more than the ", kMaxTokenizerFileBytes, "-byte limit for tokenizer files");
  std::ifstream in(path, std::ios::binary);
  QTUNE_CHECK(in.good(), "cannot read ", what, " ", path);
  std::string data(static_cast<size_t>(size), '\0');
  in.read(data.data(), static_cast<std::streamsize>(size));
  QTUNE_CHECK(static_cast<size_t>(in.gcount()) == size, "cannot read ", what, " ", path);
  return data;
}

namespace {

// =============================================================================================
// UTF-8 and GPT-2's byte <-> unicode map

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// The codepoint of a valid sequence of `len` bytes at s[i] (len from utf8_char_len).
uint32_t decode_utf8(std::string_view s, size_t i, size_t len) {
  const auto b = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[i + k])); };
  if (len == 1) return b(0);
  if (len == 2) return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
  if (len == 3) return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
  return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
}

// openai/gpt-2 src/encoder.py bytes_to_unicode(): printable Latin-1 bytes map to themselves, the
// other 68 to U+0100.. in byte order, so every byte string is a printable unicode string.
struct ByteMap {
  std::string to_unicode[256];
  std::unordered_map<uint32_t, uint8_t> from_cp;
  ByteMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      append_utf8(to_unicode[b], cp);
      from_cp[cp] = static_cast<uint8_t>(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

std::string bytes_to_unicode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) out += byte_map().to_unicode[b];
  return out;
}

// False when `s` holds a character outside the map (e.g. an added token's own spelling).
bool unicode_to_bytes(std::string_view s, std::string& out) {
  out.clear();
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_char_len(s, i);
    auto it = byte_map().from_cp.find(decode_utf8(s, i, n));
    if (it == byte_map().from_cp.end()) return false;
    out += static_cast<char>(it->second);
    i += n;
  }
  return true;
}

const std::string kSpmSpace = "\xE2\x96\x81";  // U+2581, sentencepiece's visible space

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}
int byte_token_value(std::string_view p) {  // "<0xNN>" -> NN, else -1
  if (p.size() != 6 || p.substr(0, 3) != "<0x" || p[5] != '>') return -1;
  const int hi = hex_digit(p[3]), lo = hex_digit(p[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}
std::string byte_token_name(int b) {
  char buf[8];
  std::snprintf(buf, sizeof(buf), "<0x%02X>", b);
  return buf;
}

std::string replace_all(std::string_view s, const std::string& from, const std::string& to) {
  if (from.empty()) return std::string(s);
  std::string out;
  size_t pos = 0;
  while (true) {
    const size_t k = s.find(from, pos);
    if (k == std::string_view::npos) break;
    out.append(s.substr(pos, k - pos));
    out += to;
    pos = k + from.size();
  }
  out.append(s.substr(pos));
  return out;
}

std::string nfc(const std::string& s) {
  bool ascii = true;
  for (unsigned char c : s) ascii &= c < 0x80;
  if (ascii) return s;
  UErrorCode st = U_ZERO_ERROR;
  const icu::Normalizer2* n = icu::Normalizer2::getNFCInstance(st);
  QTUNE_CHECK(U_SUCCESS(st), "ICU NFC normalizer unavailable: ", u_errorName(st));
  const icu::UnicodeString u = icu::UnicodeString::fromUTF8(icu::StringPiece(s.data(), s.size()));
  if (n->isNormalized(u, st) && U_SUCCESS(st)) return s;
  st = U_ZERO_ERROR;
  const icu::UnicodeString v = n->normalize(u, st);
  QTUNE_CHECK(U_SUCCESS(st), "NFC normalization failed: ", u_errorName(st));
  std::string out;
  v.toUTF8String(out);
  return out;
}

std::string describe(const Json& j) { return j.dump().substr(0, 80); }

// =============================================================================================
// The BPE model: vocabulary, merge ranks, and the merge loop

class BpeModel {
 public:
  std::vector<std::string> pieces;            // id -> token bytes as BPE sees them
  std::unordered_map<std::string, int> ids;   // token bytes -> id
  // (left << 32 | right) -> (rank << 32 | merged id); a lower rank merges first.
  std::unordered_map<uint64_t, uint64_t> merges;

  void add_merge(int left, int right, int merged, uint32_t rank) {
    const uint64_t key = (static_cast<uint64_t>(left) << 32) | static_cast<uint32_t>(right);
    merges.emplace(key, (static_cast<uint64_t>(rank) << 32) | static_cast<uint32_t>(merged));
  }

  // Applies merges to `sym` in place: repeatedly the adjacent pair of lowest rank, leftmost on
  // ties (HF tokenizers' BPE word merge; tiktoken's rule when rank = rank of the merged token).
  void merge(std::vector<int>& sym) const {
    if (sym.size() < 2) return;
    if (sym.size() <= 32) return merge_small(sym);
    // Long words (a megabyte of letters is one pre-token): O(n log n).
    merge_pairs<uint32_t>(sym, [this](int l, int r, uint32_t& rank, int& merged) {
      return lookup(l, r, rank, merged);
    });
  }

 private:
  bool lookup(int l, int r, uint32_t& rank, int& merged) const {
    auto it = merges.find((static_cast<uint64_t>(l) << 32) | static_cast<uint32_t>(r));
    if (it == merges.end()) return false;
    rank = static_cast<uint32_t>(it->second >> 32);
    merged = static_cast<int>(it->second & 0xFFFFFFFFu);
    return true;
  }

  // Short words: a rank per adjacent pair, rescanned per merge (tiktoken's loop).
  void merge_small(std::vector<int>& sym) const {
    struct Pair {
      uint32_t rank;
      int merged;
    };
    std::vector<Pair> pr(sym.size() - 1);
    auto set = [&](size_t i) {
      if (!lookup(sym[i], sym[i + 1], pr[i].rank, pr[i].merged)) pr[i].rank = UINT32_MAX;
    };
    for (size_t i = 0; i + 1 < sym.size(); ++i) set(i);
    while (!pr.empty()) {
      size_t best = 0;
      for (size_t i = 1; i < pr.size(); ++i)
        if (pr[i].rank < pr[best].rank) best = i;
      if (pr[best].rank == UINT32_MAX) break;
      sym[best] = pr[best].merged;
      sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(best) + 1);
      pr.erase(pr.begin() + static_cast<std::ptrdiff_t>(best));
      if (best < pr.size()) set(best);
      if (best > 0) set(best - 1);
    }
  }

};

// =============================================================================================
// The pipeline

struct Normalizer {
  enum Kind { kPrepend, kReplace, kNfc } kind;
  std::string a, b;  // prepend text; replace from -> to
};

struct PreTokenizer {
  enum Kind { kSplit, kByteLevel, kMetaspace } kind;
  std::shared_ptr<Regex> re;   // kSplit; kByteLevel with use_regex
  bool removed = false;        // kSplit behavior "Removed": matches dropped
  bool add_prefix_space = false;  // kByteLevel
  std::string replacement;     // kMetaspace
  enum Scheme { kAlways, kFirst, kNever } scheme = kAlways;
  bool split = true;           // kMetaspace
};

struct AddedToken {
  std::string content;
  int id = -1;
  bool special = false, lstrip = false, rstrip = false;
};

std::atomic<uint64_t> g_instance_serial{0};

class BpeTokenizer : public Tokenizer {
 public:
  explicit BpeTokenizer(std::string path, std::string kind)
      : path_(std::move(path)), kind_(std::move(kind)), serial_(++g_instance_serial) {}

  // ---- filled by the loaders
  std::string path_, kind_;
  BpeModel model_;
  bool byte_level_ = false, byte_fallback_ = false, ignore_merges_ = false, fuse_unk_ = false;
  bool strip_leading_space_ = false;  // sentencepiece-style decode: drop the dummy prefix
  bool split_at_space_ = false;       // set by finish(), see can_split_at_space()
  int unk_id_ = -1;
  std::vector<Normalizer> normalizers_;
  std::vector<PreTokenizer> pretokenizers_;
  std::vector<AddedToken> added_;
  std::vector<std::string> file_pieces_;             // id -> spelling in the file
  std::unordered_map<std::string, int> file_ids_;    // spelling in the file -> id
  std::string json_;                                 // tokenizer.json text, when built or read
  std::function<std::string()> make_json_;           // or how to build it
  int bos_ = -1, eos_ = -1;

  // Called once the fields above are set: vocabulary size, decode table, added-token trie.
  void finish() {
    int64_t n = static_cast<int64_t>(model_.pieces.size());
    for (const auto& a : added_) n = std::max<int64_t>(n, a.id + 1);
    vocab_size_ = n;
    model_.pieces.resize(static_cast<size_t>(n));
    file_pieces_.resize(static_cast<size_t>(n));
    decoded_.assign(static_cast<size_t>(n), std::string());
    present_.assign(static_cast<size_t>(n), 0);
    special_.assign(static_cast<size_t>(n), 0);
    for (const auto& [piece, id] : model_.ids) {
      present_[static_cast<size_t>(id)] = 1;
      std::string& d = decoded_[static_cast<size_t>(id)];
      if (byte_level_) {
        d = piece;
      } else if (byte_fallback_ && byte_token_value(piece) >= 0) {
        d = std::string(1, static_cast<char>(byte_token_value(piece)));
      } else {
        d = replace_all(piece, kSpmSpace, " ");
      }
    }
    for (size_t k = 0; k < added_.size(); ++k) {
      const auto& a = added_[k];
      present_[static_cast<size_t>(a.id)] = 1;
      decoded_[static_cast<size_t>(a.id)] = a.content;
      special_[static_cast<size_t>(a.id)] = a.special;
      file_pieces_[static_cast<size_t>(a.id)] = a.content;
      file_ids_[a.content] = a.id;
      trie_insert(a.content, static_cast<int>(k));
    }
    split_at_space_ = !byte_level_ && model_.ids.count(kSpmSpace) && can_split_at_space();
    for (int b = 0; b < 256; ++b) {
      byte_id_[b] = -1;
      auto it = model_.ids.find(byte_level_ ? std::string(1, static_cast<char>(b))
                                            : byte_token_name(b));
      if (it != model_.ids.end()) byte_id_[b] = it->second;
      if (byte_level_)
        QTUNE_CHECK(byte_id_[b] >= 0, kind_, " ", path_,
                    ": a byte-level BPE vocabulary needs a token for every byte, byte 0x",
                    std::hex, b, " (\"", byte_map().to_unicode[b], "\") has none");
    }
  }

  // ---- Tokenizer
  int64_t vocab_size() const override { return vocab_size_; }
  int bos_id() const override { return bos_; }
  int eos_id() const override { return eos_; }

  std::vector<int> encode(const std::string& text, bool bos, bool eos) const override {
    std::vector<int> ids;
    ids.reserve(text.size() / 3 + 4);
    if (bos && bos_ >= 0) ids.push_back(bos_);
    size_t start = 0, i = 0;
    bool first = true;
    while (i < text.size()) {
      size_t len = 0;
      const int k = trie_match(text, i, len);
      if (k < 0) {
        ++i;
        continue;
      }
      const AddedToken& a = added_[static_cast<size_t>(k)];
      size_t seg_end = i;
      if (a.lstrip)
        while (seg_end > start && std::isspace(static_cast<unsigned char>(text[seg_end - 1])))
          --seg_end;
      if (seg_end > start) encode_segment(std::string_view(text).substr(start, seg_end - start), first, ids);
      first = false;
      ids.push_back(a.id);
      i += len;
      if (a.rstrip)
        while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
      start = i;
    }
    if (start < text.size()) encode_segment(std::string_view(text).substr(start), first, ids);
    if (eos && eos_ >= 0) ids.push_back(eos_);
    return ids;
  }

  std::string decode_token(int prev, int token) const override {
    QTUNE_CHECK(token >= 0 && token < vocab_size_ && present_[static_cast<size_t>(token)],
                "token id ", token, " is not in the vocabulary of ", path_, " (", vocab_size_,
                " ids)");
    const std::string& d = decoded_[static_cast<size_t>(token)];
    if (strip_leading_space_ && (prev < 0 || prev == bos_) && !d.empty() && d[0] == ' ' &&
        !special_[static_cast<size_t>(token)])
      return d.substr(1);
    return d;
  }

  int token_to_id(const std::string& piece) const override {
    auto it = file_ids_.find(piece);
    return it == file_ids_.end() ? -1 : it->second;
  }
  bool is_special(int id) const override {
    return id >= 0 && id < vocab_size_ && special_[static_cast<size_t>(id)];
  }
  std::string to_hf_json() const override { return json_.empty() ? make_json_() : json_; }

  /// Resolves BOS/EOS/pad from tokenizer_config.json (over the format's defaults) and fills
  /// config_. `default_bos`/`default_eos` are token spellings ("" for none).
  void resolve_specials(const ConfigFile& f, const std::string& default_bos,
                        const std::string& default_eos, bool default_add_bos,
                        bool default_add_eos) {
    config_ = f.config;
    auto resolve = [&](bool has, std::string& text, const std::string& fallback,
                       const char* key) {
      if (!has) text = fallback;
      if (text.empty()) return -1;
      const int id = token_to_id(text);
      QTUNE_CHECK(id >= 0, has ? f.config.path : path_, ": ", key, " \"", text,
                  "\" is not a token of ", path_);
      return id;
    };
    bos_ = resolve(f.has_bos_token, config_.bos_token, default_bos, "bos_token");
    eos_ = resolve(f.has_eos_token, config_.eos_token, default_eos, "eos_token");
    config_.pad_id = resolve(f.has_pad_token, config_.pad_token, "", "pad_token");
    if (config_.unk_token.empty() && unk_id_ >= 0)
      config_.unk_token = file_pieces_[static_cast<size_t>(unk_id_)];
    config_.add_bos_token = f.has_add_bos_token ? f.config.add_bos_token : default_add_bos;
    config_.add_eos_token = f.has_add_eos_token ? f.config.add_eos_token : default_add_eos;
  }

  void add_vocab(const std::string& file_piece, const std::string& bpe_piece, int id) {
    if (static_cast<size_t>(id) >= model_.pieces.size()) {
      model_.pieces.resize(static_cast<size_t>(id) + 1);
      file_pieces_.resize(static_cast<size_t>(id) + 1);
    }
    model_.pieces[static_cast<size_t>(id)] = bpe_piece;
    model_.ids.emplace(bpe_piece, id);
    file_pieces_[static_cast<size_t>(id)] = file_piece;
    file_ids_.emplace(file_piece, id);
  }

 private:
  // ---- added tokens: a byte trie, longest match at a position (HF matches leftmost-longest)
  void trie_insert(const std::string& s, int token) {
    if (s.empty()) return;
    first_byte_[static_cast<unsigned char>(s[0])] = 1;
    if (trie_token_.empty()) trie_token_.push_back(-1);
    int node = 0;
    for (unsigned char c : s) {
      const uint64_t key = (static_cast<uint64_t>(node) << 8) | c;
      auto it = trie_next_.find(key);
      if (it == trie_next_.end()) {
        trie_token_.push_back(-1);
        it = trie_next_.emplace(key, static_cast<int>(trie_token_.size() - 1)).first;
      }
      node = it->second;
    }
    if (trie_token_[static_cast<size_t>(node)] < 0) trie_token_[static_cast<size_t>(node)] = token;
  }
  int trie_match(const std::string& s, size_t i, size_t& len) const {
    if (!first_byte_[static_cast<unsigned char>(s[i])]) return -1;
    int node = 0, found = -1;
    for (size_t k = i; k < s.size(); ++k) {
      auto it = trie_next_.find((static_cast<uint64_t>(node) << 8) |
                                static_cast<unsigned char>(s[k]));
      if (it == trie_next_.end()) break;
      node = it->second;
      if (trie_token_[static_cast<size_t>(node)] >= 0) {
        found = trie_token_[static_cast<size_t>(node)];
        len = k + 1 - i;
      }
    }
    return found;
  }

  // ---- one text segment between added tokens
  void encode_segment(std::string_view seg, bool first, std::vector<int>& out) const {
    std::string s(seg);
    for (const auto& n : normalizers_) {
      if (n.kind == Normalizer::kPrepend) {
        if (!s.empty()) s = n.a + s;
      } else if (n.kind == Normalizer::kReplace) {
        s = replace_all(s, n.a, n.b);
      } else {
        s = nfc(s);
      }
    }
    std::vector<std::string> pieces{std::move(s)}, next;
    std::vector<Regex::Piece> parts;
    for (const auto& p : pretokenizers_) {
      next.clear();
      for (size_t k = 0; k < pieces.size(); ++k) {
        std::string& piece = pieces[k];
        if (p.kind == PreTokenizer::kMetaspace) {
          piece = replace_all(piece, " ", p.replacement);
          const bool prepend = p.scheme == PreTokenizer::kAlways ||
                               (p.scheme == PreTokenizer::kFirst && first && k == 0);
          if (prepend && piece.compare(0, p.replacement.size(), p.replacement) != 0)
            piece = p.replacement + piece;
          if (!p.split) {
            next.push_back(std::move(piece));
            continue;
          }
          // Split before each replacement character (HF's MergedWithNext).
          size_t from = 0;
          for (size_t q = piece.find(p.replacement, 1); q != std::string::npos;
               q = piece.find(p.replacement, q + p.replacement.size())) {
            next.push_back(piece.substr(from, q - from));
            from = q;
          }
          next.push_back(piece.substr(from));
          continue;
        }
        if (p.kind == PreTokenizer::kByteLevel && p.add_prefix_space && !piece.empty() &&
            piece[0] != ' ')
          piece = " " + piece;
        if (!p.re) {
          next.push_back(std::move(piece));
          continue;
        }
        parts.clear();
        p.re->split(piece, parts);
        for (const auto& part : parts)
          if (!(part.matched && p.removed)) next.push_back(piece.substr(part.begin, part.end - part.begin));
      }
      pieces.swap(next);
    }
    for (const auto& piece : pieces) {
      if (piece.empty()) continue;
      if (!split_at_space_) {
        encode_word(piece, out);
        continue;
      }
      // Before each U+2581 that follows another character (see can_split_at_space).
      size_t from = 0;
      for (size_t q = piece.find(kSpmSpace, 1); q != std::string::npos;
           q = piece.find(kSpmSpace, q + kSpmSpace.size())) {
        if (q >= kSpmSpace.size() &&
            piece.compare(q - kSpmSpace.size(), kSpmSpace.size(), kSpmSpace) == 0)
          continue;
        encode_word(piece.substr(from, q - from), out);
        from = q;
      }
      encode_word(piece.substr(from), out);
    }
  }

  // A sentencepiece-style vocabulary has no piece with U+2581 after another character (pieces
  // start a word or are runs of spaces). Then no BPE symbol can span "X▁", and BPE on the text
  // cut before each such ▁ gives the same ids as on the whole text (merges on either side never
  // interact), but in word-sized, cacheable pieces instead of one O(n log n) run over a whole
  // document. Byte-token merges could spell ▁ in bytes, so any disables the cut.
  bool can_split_at_space() const {
    for (const auto& [piece, id] : model_.ids) {
      for (size_t q = piece.find(kSpmSpace, 1); q != std::string::npos;
           q = piece.find(kSpmSpace, q + 1))
        if (!(q >= kSpmSpace.size() &&
              piece.compare(q - kSpmSpace.size(), kSpmSpace.size(), kSpmSpace) == 0))
          return false;
    }
    for (const auto& [key, value] : model_.merges)
      for (int side : {static_cast<int>(key >> 32), static_cast<int>(key & 0xFFFFFFFFu)})
        if (byte_token_value(model_.pieces[static_cast<size_t>(side)]) >= 0) return false;
    return true;
  }

  // Words repeat (Zipf): a per-thread cache of recent short words, keyed by this instance.
  struct WordCache {
    uint64_t owner = 0;
    std::unordered_map<std::string, std::vector<int>> map;
  };

  void encode_word(const std::string& word, std::vector<int>& out) const {
    if (ignore_merges_) {
      auto it = model_.ids.find(word);
      if (it != model_.ids.end()) {
        out.push_back(it->second);
        return;
      }
    }
    thread_local WordCache cache;
    const bool cacheable = word.size() <= 64;
    if (cacheable) {
      if (cache.owner != serial_ || cache.map.size() > 100000) {
        cache.map.clear();
        cache.owner = serial_;
      }
      auto it = cache.map.find(word);
      if (it != cache.map.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int> sym;
    sym.reserve(word.size());
    if (byte_level_) {
      for (unsigned char c : word) sym.push_back(byte_id_[c]);
    } else {
      bool last_unk = false;
      for (size_t i = 0; i < word.size();) {
        const size_t n = utf8_char_len(word, i);
        auto it = model_.ids.find(word.substr(i, n));
        if (it != model_.ids.end()) {
          sym.push_back(it->second);
          last_unk = false;
        } else {
          bool bytes = byte_fallback_;
          for (size_t k = 0; k < n && bytes; ++k)
            bytes = byte_id_[static_cast<unsigned char>(word[i + k])] >= 0;
          if (bytes) {
            for (size_t k = 0; k < n; ++k)
              sym.push_back(byte_id_[static_cast<unsigned char>(word[i + k])]);
            last_unk = false;
          } else {
            QTUNE_CHECK(unk_id_ >= 0, "text character \"", word.substr(i, n),
                        "\" is not in the vocabulary of ", path_,
                        ", which has neither byte fallback nor an unk_token");
            if (!(fuse_unk_ && last_unk)) sym.push_back(unk_id_);
            last_unk = true;
          }
        }
        i += n;
      }
    }
    model_.merge(sym);
    out.insert(out.end(), sym.begin(), sym.end());
    if (cacheable) cache.map.emplace(word, std::move(sym));
  }

  uint64_t serial_;
  int64_t vocab_size_ = 0;
  std::vector<std::string> decoded_;
  std::vector<char> present_, special_;
  int byte_id_[256];
  bool first_byte_[256] = {};  // bytes an added token starts with
  std::unordered_map<uint64_t, int> trie_next_;
  std::vector<int> trie_token_;
};

// =============================================================================================
// tokenizer.json

struct JsonCtx {
  const std::string& path;
  [[noreturn]] void fail(const std::string& what) const { throw UserError(path + ": " + what); }
  const Json& need(const Json& obj, const char* key, const std::string& where) const {
    if (!obj.is_object() || !obj.contains(key)) fail(where + " lacks \"" + key + "\"");
    return obj[key];
  }
  std::string str(const Json& obj, const char* key, const std::string& where) const {
    const Json& v = need(obj, key, where);
    if (!v.is_string()) fail(where + "." + key + " must be a string, got " + describe(v));
    return v.get<std::string>();
  }
  bool flag(const Json& obj, const char* key, bool fallback, const std::string& where) const {
    if (!obj.is_object() || !obj.contains(key) || obj[key].is_null()) return fallback;
    if (!obj[key].is_boolean())
      fail(where + "." + key + " must be true or false, got " + describe(obj[key]));
    return obj[key].get<bool>();
  }
  int id(const Json& v, const std::string& where) const {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= kMaxTokenId)
      fail(where + " must be a token id in [0, " + std::to_string(kMaxTokenId) + "), got " +
           describe(v));
    return static_cast<int>(v.get<int64_t>());
  }
};

// For a {"type": "Sequence", `key`: [...]} component: calls fn(element, where) on each element
// and returns true; false for any other type.
template <typename Fn>
bool each_in_sequence(const JsonCtx& c, const Json& j, const char* key, const std::string& where,
                      Fn&& fn) {
  if (c.str(j, "type", where) != "Sequence") return false;
  const Json& list = c.need(j, key, where);
  if (!list.is_array()) c.fail(where + "." + key + " must be an array");
  for (size_t k = 0; k < list.size(); ++k)
    fn(list[k], where + "." + key + "[" + std::to_string(k) + "]");
  return true;
}

void parse_normalizer(const JsonCtx& c, const Json& j, const std::string& where,
                      std::vector<Normalizer>& out) {
  if (j.is_null() || each_in_sequence(c, j, "normalizers", where, [&](const Json& e, const std::string& w) {
        parse_normalizer(c, e, w, out);
      }))
    return;
  const std::string type = c.str(j, "type", where);
  if (type == "Prepend") {
    out.push_back({Normalizer::kPrepend, c.str(j, "prepend", where), ""});
  } else if (type == "Replace") {
    const Json& pat = c.need(j, "pattern", where);
    if (!pat.is_object() || !pat.contains("String") || !pat["String"].is_string())
      c.fail(where + ": Replace is supported with a {\"String\": ...} pattern only, got " +
             describe(pat));
    out.push_back({Normalizer::kReplace, pat["String"].get<std::string>(),
                   c.str(j, "content", where)});
  } else if (type == "NFC") {
    out.push_back({Normalizer::kNfc, "", ""});
  } else {
    c.fail(where + ": normalizer type \"" + type +
           "\" is not supported (supported: Sequence, Prepend, Replace, NFC)");
  }
}

void parse_pretokenizer(const JsonCtx& c, const Json& j, const std::string& where,
                        std::vector<PreTokenizer>& out, bool& byte_level) {
  if (j.is_null() || each_in_sequence(c, j, "pretokenizers", where, [&](const Json& e, const std::string& w) {
        parse_pretokenizer(c, e, w, out, byte_level);
      }))
    return;
  const std::string type = c.str(j, "type", where);
  PreTokenizer p;
  if (type == "ByteLevel") {
    byte_level = true;
    p.kind = PreTokenizer::kByteLevel;
    p.add_prefix_space = c.flag(j, "add_prefix_space", true, where);
    if (c.flag(j, "use_regex", true, where))
      p.re = std::make_shared<Regex>(kGpt2Pattern, false, c.path + " " + where);
  } else if (type == "Split") {
    p.kind = PreTokenizer::kSplit;
    const Json& pat = c.need(j, "pattern", where);
    const bool regex = pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string();
    const bool literal = pat.is_object() && pat.contains("String") && pat["String"].is_string();
    if (!regex && !literal)
      c.fail(where + ".pattern must be {\"Regex\": string} or {\"String\": string}, got " +
             describe(pat));
    const std::string behavior = c.str(j, "behavior", where);
    if (behavior != "Isolated" && behavior != "Removed")
      c.fail(where + ": Split behavior \"" + behavior +
             "\" is not supported (supported: Isolated, Removed)");
    if (c.flag(j, "invert", false, where)) c.fail(where + ": Split with invert true is not supported");
    p.removed = behavior == "Removed";
    p.re = std::make_shared<Regex>(pat[regex ? "Regex" : "String"].get<std::string>(), literal,
                                   c.path + " " + where);
  } else if (type == "Metaspace") {
    p.kind = PreTokenizer::kMetaspace;
    p.replacement = j.contains("replacement") ? c.str(j, "replacement", where) : kSpmSpace;
    p.split = c.flag(j, "split", true, where);
    if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null()) {
      const std::string s = c.str(j, "prepend_scheme", where);
      if (s == "always")
        p.scheme = PreTokenizer::kAlways;
      else if (s == "first")
        p.scheme = PreTokenizer::kFirst;
      else if (s == "never")
        p.scheme = PreTokenizer::kNever;
      else
        c.fail(where + ".prepend_scheme must be always, first or never, got \"" + s + "\"");
    } else {
      p.scheme = c.flag(j, "add_prefix_space", true, where) ? PreTokenizer::kAlways
                                                            : PreTokenizer::kNever;
    }
  } else if (type == "Digits") {
    p.kind = PreTokenizer::kSplit;
    p.re = std::make_shared<Regex>(c.flag(j, "individual_digits", false, where) ? "\\p{N}"
                                                                               : "\\p{N}+",
                                   false, c.path + " " + where);
  } else {
    c.fail(where + ": pre_tokenizer type \"" + type +
           "\" is not supported (supported: Sequence, ByteLevel, Split, Metaspace, Digits)");
  }
  out.push_back(std::move(p));
}

// Checks the decoder and tells whether it drops the leading (dummy-prefix) space.
void parse_decoder(const JsonCtx& c, const Json& j, const std::string& where, bool& strip) {
  if (j.is_null() || each_in_sequence(c, j, "decoders", where, [&](const Json& e, const std::string& w) {
        parse_decoder(c, e, w, strip);
      }))
    return;
  const std::string type = c.str(j, "type", where);
  if (type == "Strip") {
    const Json& start = c.need(j, "start", where);
    if (!start.is_number_integer()) c.fail(where + ".start must be an integer");
    if (start.get<int64_t>() > 0 && c.str(j, "content", where) == " ") strip = true;
  } else if (type == "Metaspace") {
    const std::string scheme = j.contains("prepend_scheme") && j["prepend_scheme"].is_string()
                                   ? j["prepend_scheme"].get<std::string>()
                                   : (c.flag(j, "add_prefix_space", true, where) ? "always" : "never");
    if (scheme != "never") strip = true;
  } else if (type != "ByteLevel" && type != "Replace" && type != "ByteFallback" &&
             type != "Fuse") {
    c.fail(where + ": decoder type \"" + type +
           "\" is not supported (supported: Sequence, ByteLevel, Metaspace, Replace, "
           "ByteFallback, Fuse, Strip)");
  }
}

// The special tokens a TemplateProcessing post-processor puts around a single sequence.
void template_specials(const Json& pp, std::string& bos, std::string& eos) {
  if (!pp.is_object() || !pp.contains("type") || !pp["type"].is_string()) return;
  if (pp["type"] == "Sequence" && pp.contains("processors") && pp["processors"].is_array()) {
    for (const Json& p : pp["processors"]) template_specials(p, bos, eos);
    return;
  }
  if (pp["type"] != "TemplateProcessing" || !pp.contains("single") || !pp["single"].is_array())
    return;
  bool seen_sequence = false;
  for (const Json& item : pp["single"]) {
    if (item.contains("Sequence")) seen_sequence = true;
    if (item.contains("SpecialToken") && item["SpecialToken"].contains("id") &&
        item["SpecialToken"]["id"].is_string())
      (seen_sequence ? eos : bos) = item["SpecialToken"]["id"].get<std::string>();
  }
}

// The first of `names` that is a token, "" if none.
std::string first_token(const BpeTokenizer& t, std::initializer_list<const char*> names) {
  for (const char* n : names)
    if (t.token_to_id(n) >= 0) return n;
  return "";
}

std::pair<std::string, std::string> split_merge(const JsonCtx& c, const Json& m, size_t k) {
  const std::string where = "model.merges[" + std::to_string(k) + "]";
  if (m.is_string()) {
    const std::string s = m.get<std::string>();
    const size_t sp = s.find(' ');
    if (sp == std::string::npos || sp == 0 || sp + 1 >= s.size() ||
        s.find(' ', sp + 1) != std::string::npos)
      c.fail(where + " must be \"left right\" (two tokens, one space), got " + describe(m));
    return {s.substr(0, sp), s.substr(sp + 1)};
  }
  if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string())
    return {m[0].get<std::string>(), m[1].get<std::string>()};
  c.fail(where + " must be \"left right\" or [left, right], got " + describe(m));
}

// Vocabulary and merges into `t` (byte-level: spellings mapped back to bytes for BPE).
void fill_vocab_and_merges(const JsonCtx& c, BpeTokenizer& t, const Json& vocab,
                           const Json& merges) {
  if (!vocab.is_object()) c.fail("model.vocab must be an object {token: id}, got " + describe(vocab));
  std::string bytes;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const int id = c.id(it.value(), "model.vocab[\"" + it.key().substr(0, 40) + "\"]");
    if (id < static_cast<int>(t.file_pieces_.size()) && !t.file_pieces_[static_cast<size_t>(id)].empty())
      c.fail("model.vocab gives id " + std::to_string(id) + " to both \"" +
             t.file_pieces_[static_cast<size_t>(id)] + "\" and \"" + it.key() + "\"");
    if (t.byte_level_ && unicode_to_bytes(it.key(), bytes))
      t.add_vocab(it.key(), bytes, id);
    else
      t.add_vocab(it.key(), it.key(), id);
  }
  if (!merges.is_array()) c.fail("model.merges must be an array, got " + describe(merges));
  for (size_t k = 0; k < merges.size(); ++k) {
    // Not a structured binding: clang before 16 cannot capture one in the lambda below.
    const auto merge = split_merge(c, merges[k], k);
    const std::string& a = merge.first;
    const std::string& b = merge.second;
    auto find = [&](const std::string& s) {
      auto it = t.file_ids_.find(s);
      if (it == t.file_ids_.end())
        c.fail("model.merges[" + std::to_string(k) + "] \"" + a + " " + b + "\": \"" + s +
               "\" is not in model.vocab");
      return it->second;
    };
    const int l = find(a), r = find(b), m = find(a + b);
    t.model_.add_merge(l, r, m, static_cast<uint32_t>(k));
  }
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer_json(const std::string& path, const ConfigFile& cfg) {
  const std::string text = read_tokenizer_file(path, "tokenizer.json");
  Json j;
  try {
    j = Json::parse(text);
  } catch (const Json::exception& e) {
    throw UserError(path + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  const JsonCtx c{path};
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object())
    c.fail("expected a Hugging Face tokenizer.json (an object with a \"model\" object)");
  const Json& model = j["model"];
  const std::string type = model.contains("type") ? c.str(model, "type", "model") : "BPE";
  if (type != "BPE")
    c.fail("model.type \"" + type + "\" is not supported (only BPE; Unigram, WordPiece and "
           "WordLevel models are not)");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (model.contains(key) && !model[key].is_null() &&
        !(model[key].is_string() && model[key].get<std::string>().empty()))
      c.fail(std::string("model.") + key + " is not supported, got " + describe(model[key]));
  if (model.contains("dropout") && !model["dropout"].is_null() &&
      !(model["dropout"].is_number() && model["dropout"].get<double>() == 0.0))
    c.fail("model.dropout must be null (BPE dropout is for training tokenizers), got " +
           describe(model["dropout"]));

  auto t = std::make_unique<BpeTokenizer>(path, "tokenizer.json");
  if (j.contains("normalizer")) parse_normalizer(c, j["normalizer"], "normalizer", t->normalizers_);
  if (j.contains("pre_tokenizer"))
    parse_pretokenizer(c, j["pre_tokenizer"], "pre_tokenizer", t->pretokenizers_, t->byte_level_);
  if (j.contains("decoder") && j["decoder"].is_object() && j["decoder"].contains("type") &&
      j["decoder"]["type"] == "ByteLevel")
    t->byte_level_ = true;
  if (j.contains("decoder")) parse_decoder(c, j["decoder"], "decoder", t->strip_leading_space_);
  if (t->byte_level_) t->strip_leading_space_ = false;
  t->byte_fallback_ = c.flag(model, "byte_fallback", false, "model");
  t->ignore_merges_ = c.flag(model, "ignore_merges", false, "model");
  t->fuse_unk_ = c.flag(model, "fuse_unk", false, "model");
  fill_vocab_and_merges(c, *t, c.need(model, "vocab", "model"), c.need(model, "merges", "model"));

  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    const Json& list = j["added_tokens"];
    if (!list.is_array()) c.fail("added_tokens must be an array");
    for (size_t k = 0; k < list.size(); ++k) {
      const std::string where = "added_tokens[" + std::to_string(k) + "]";
      AddedToken a;
      a.id = c.id(c.need(list[k], "id", where), where + ".id");
      a.content = c.str(list[k], "content", where);
      if (a.content.empty()) c.fail(where + ".content is empty");
      a.special = c.flag(list[k], "special", false, where);
      a.lstrip = c.flag(list[k], "lstrip", false, where);
      a.rstrip = c.flag(list[k], "rstrip", false, where);
      t->added_.push_back(std::move(a));
    }
  }
  if (model.contains("unk_token") && !model["unk_token"].is_null()) {
    const std::string unk = c.str(model, "unk_token", "model");
    auto it = t->file_ids_.find(unk);
    if (it == t->file_ids_.end()) c.fail("model.unk_token \"" + unk + "\" is not in model.vocab");
    t->unk_id_ = it->second;
  }
  t->finish();

  std::string bos, eos;
  if (j.contains("post_processor")) template_specials(j["post_processor"], bos, eos);
  const bool add_bos = !bos.empty(), add_eos = !eos.empty();
  if (bos.empty()) bos = first_token(*t, {"<s>", "<|begin_of_text|>", "<|endoftext|>"});
  if (eos.empty()) eos = first_token(*t, {"</s>", "<|end_of_text|>", "<|endoftext|>"});
  t->resolve_specials(cfg, bos, eos, add_bos, add_eos);
  t->json_ = text;
  return t;
}

// =============================================================================================
// GPT-2 vocab.json + merges.txt

namespace {

// ---- writing tokenizer.json: the parts both writers share

Json added_token_json(int id, const std::string& content, bool special, bool normalized) {
  return {{"id", id},          {"content", content},       {"single_word", false},
          {"lstrip", false},   {"rstrip", false},          {"normalized", normalized},
          {"special", special}};
}

// A TemplateProcessing that puts the BOS `bos` (spelled `text`) in front of each sequence.
Json bos_template(const std::string& text, int bos) {
  auto special = [&](int type_id) {
    return Json{{"SpecialToken", {{"id", text}, {"type_id", type_id}}}};
  };
  auto sequence = [](const char* id, int type_id) {
    return Json{{"Sequence", {{"id", id}, {"type_id", type_id}}}};
  };
  return {{"type", "TemplateProcessing"},
          {"single", {special(0), sequence("A", 0)}},
          {"pair", {special(0), sequence("A", 0), special(1), sequence("B", 1)}},
          {"special_tokens", {{text, {{"id", text}, {"ids", {bos}}, {"tokens", {text}}}}}}};
}

struct HfBpeDocument {
  Json added = Json::array(), normalizer, pre_tokenizer, post_processor, decoder;
  Json vocab = Json::object();  // (an ordered_json inserts in O(n): 128k tokens take minutes)
  Json merges = Json::array(), unk_token;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;

  // Keys in the order the tokenizers library writes them.
  std::string dump() const {
    nlohmann::ordered_json doc, m;
    doc["version"] = "1.0";
    doc["truncation"] = nullptr;
    doc["padding"] = nullptr;
    doc["added_tokens"] = added;
    doc["normalizer"] = normalizer;
    doc["pre_tokenizer"] = pre_tokenizer;
    doc["post_processor"] = post_processor;
    doc["decoder"] = decoder;
    m["type"] = "BPE";
    m["dropout"] = nullptr;
    m["unk_token"] = unk_token;
    m["continuing_subword_prefix"] = nullptr;
    m["end_of_word_suffix"] = nullptr;
    m["fuse_unk"] = fuse_unk;
    m["byte_fallback"] = byte_fallback;
    m["ignore_merges"] = ignore_merges;
    m["vocab"] = vocab;
    m["merges"] = merges;
    doc["model"] = m;
    return doc.dump() + "\n";
  }
};

// A byte-level BPE tokenizer (GPT-2, tiktoken) as tokenizer.json.
std::string byte_level_json(const BpeTokenizer& t, const Json& merges, const Json& pre_tokenizer,
                            bool ignore_merges) {
  HfBpeDocument d;
  for (const auto& [piece, id] : t.model_.ids) d.vocab[t.file_pieces_[static_cast<size_t>(id)]] = id;
  for (const auto& a : t.added_) d.added.push_back(added_token_json(a.id, a.content, a.special, false));
  d.pre_tokenizer = pre_tokenizer;
  d.post_processor = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false},
                      {"use_regex", true}};
  const int bos = t.bos_id();
  if (t.config().add_bos_token && bos >= 0)
    d.post_processor = {{"type", "Sequence"},
                        {"processors", {d.post_processor,
                                        bos_template(t.file_pieces_[static_cast<size_t>(bos)], bos)}}};
  d.decoder = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true},
               {"use_regex", true}};
  d.merges = merges;
  d.ignore_merges = ignore_merges;
  return d.dump();
}

}  // namespace

std::unique_ptr<Tokenizer> load_gpt2_vocab_merges(const std::string& vocab_path,
                                                  const std::string& merges_path,
                                                  const ConfigFile& cfg) {
  const JsonCtx c{vocab_path};
  Json vocab;
  try {
    vocab = Json::parse(read_tokenizer_file(vocab_path, "GPT-2 vocab.json"));
  } catch (const Json::exception& e) {
    throw UserError(vocab_path + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  if (!vocab.is_object())
    c.fail("expected a GPT-2 vocab.json object {token: id}, got " + describe(vocab));
  const std::string text = read_tokenizer_file(merges_path, "GPT-2 merges.txt");
  Json merges = Json::array();
  size_t line_no = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    const size_t sp = line.find(' ');
    QTUNE_CHECK(sp != std::string::npos && sp > 0 && sp + 1 < line.size() &&
                    line.find(' ', sp + 1) == std::string::npos,
                merges_path, ": line ", line_no,
                " must be two tokens separated by one space, got \"", line.substr(0, 80), "\"");
    merges.push_back(line);
  }
  auto t = std::make_unique<BpeTokenizer>(vocab_path, "GPT-2 vocab.json");
  t->byte_level_ = true;
  PreTokenizer p;
  p.kind = PreTokenizer::kByteLevel;
  p.re = std::make_shared<Regex>(kGpt2Pattern, false, vocab_path);
  t->pretokenizers_.push_back(p);
  try {
    fill_vocab_and_merges(c, *t, vocab, merges);
  } catch (const UserError& e) {
    throw UserError(std::string(e.what()) + " (merges from " + merges_path + ")");
  }
  if (t->file_ids_.count("<|endoftext|>"))
    t->added_.push_back({"<|endoftext|>", t->file_ids_["<|endoftext|>"], true, false, false});
  t->finish();
  t->resolve_specials(cfg, first_token(*t, {"<|endoftext|>"}), first_token(*t, {"<|endoftext|>"}),
                      false, false);
  const BpeTokenizer* self = t.get();
  t->make_json_ = [self, merges] {
    const Json pre = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
                      {"use_regex", true}};
    return byte_level_json(*self, merges, pre, false);
  };
  return t;
}

// =============================================================================================
// tiktoken rank files

bool looks_like_tiktoken(const std::string& head) {
  // "<base64> <rank>\n": base64 characters, one space, digits.
  size_t i = 0;
  while (i < head.size() && (std::isalnum(static_cast<unsigned char>(head[i])) || head[i] == '+' ||
                             head[i] == '/' || head[i] == '='))
    ++i;
  if (i == 0 || i >= head.size() || head[i] != ' ') return false;
  size_t k = i + 1;
  while (k < head.size() && std::isdigit(static_cast<unsigned char>(head[k]))) ++k;
  return k > i + 1 && k < head.size() && (head[k] == '\n' || head[k] == '\r');
}

namespace {

bool base64_decode(std::string_view s, std::string& out) {
  out.clear();
  if (s.size() % 4 != 0 || s.empty()) return false;
  auto val = [](char ch) -> int {
    if (ch >= 'A' && ch <= 'Z') return ch - 'A';
    if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9') return ch - '0' + 52;
    if (ch == '+') return 62;
    if (ch == '/') return 63;
    return -1;
  };
  for (size_t i = 0; i < s.size(); i += 4) {
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      if (s[i + k] == '=' && i + 4 == s.size() && k >= 2) {
        v[k] = 0;
        ++pad;
      } else {
        if (pad) return false;
        v[k] = val(s[i + k]);
        if (v[k] < 0) return false;
      }
    }
    const uint32_t n = (v[0] << 18) | (v[1] << 12) | (v[2] << 6) | v[3];
    out += static_cast<char>(n >> 16);
    if (pad < 2) out += static_cast<char>((n >> 8) & 0xFF);
    if (pad < 1) out += static_cast<char>(n & 0xFF);
  }
  return true;
}

// meta-llama/llama3 llama/tokenizer.py: 256 special tokens after the ranks (see SOURCES.md).
std::vector<std::string> llama3_special_tokens() {
  std::vector<std::string> s = {"<|begin_of_text|>",
                                "<|end_of_text|>",
                                "<|reserved_special_token_0|>",
                                "<|reserved_special_token_1|>",
                                "<|reserved_special_token_2|>",
                                "<|reserved_special_token_3|>",
                                "<|start_header_id|>",
                                "<|end_header_id|>",
                                "<|reserved_special_token_4|>",
                                "<|eot_id|>"};
  for (int i = 5; i < 256 - 5; ++i) s.push_back("<|reserved_special_token_" + std::to_string(i) + "|>");
  return s;
}

}  // namespace

std::unique_ptr<Tokenizer> load_tiktoken(const std::string& path, const ConfigFile& cfg) {
  const std::string text = read_tokenizer_file(path, "tiktoken file");
  auto t = std::make_unique<BpeTokenizer>(path, "tiktoken file");
  t->byte_level_ = true;
  t->ignore_merges_ = true;  // tiktoken looks a whole piece up before merging
  std::string bytes;
  size_t line_no = 0, n = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    const size_t sp = line.find(' ');
    QTUNE_CHECK(sp != std::string::npos && base64_decode(line.substr(0, sp), bytes), path,
                ": line ", line_no, " must be \"<base64 token> <rank>\", got \"",
                std::string(line.substr(0, 60)), "\"");
    const std::string_view rank_text = line.substr(sp + 1);
    int64_t rank = 0;
    // At most 9 digits, checked before any is added up: a longer rank overflowed int64_t.
    bool ok = !rank_text.empty() && rank_text.size() <= 9;
    for (size_t k = 0; ok && k < rank_text.size(); ++k) {
      ok = std::isdigit(static_cast<unsigned char>(rank_text[k])) != 0;
      rank = rank * 10 + (rank_text[k] - '0');
    }
    QTUNE_CHECK(ok && rank == static_cast<int64_t>(n), path, ": line ", line_no, " has rank \"",
                std::string(rank_text.substr(0, 20)), "\", expected ", n,
                " (ranks 0, 1, 2, ... in order)");
    QTUNE_CHECK(!t->model_.ids.count(bytes), path, ": line ", line_no,
                " repeats the token of rank ", t->model_.ids[bytes]);
    QTUNE_CHECK(static_cast<int64_t>(n) < kMaxTokenId, path, ": more than ", kMaxTokenId, " ranks");
    t->add_vocab(bytes_to_unicode(bytes), bytes, static_cast<int>(n));
    ++n;
  }
  QTUNE_CHECK(n > 0, path, ": no \"<base64 token> <rank>\" lines");
  // tiktoken merges any adjacent pair whose concatenation is a token, lowest rank first: as a
  // merge table, every split of a token into two tokens, ranked by the token.
  for (size_t id = 0; id < n; ++id) {
    const std::string& p = t->model_.pieces[id];
    for (size_t k = 1; k < p.size(); ++k) {
      auto l = t->model_.ids.find(p.substr(0, k));
      if (l == t->model_.ids.end()) continue;
      auto r = t->model_.ids.find(p.substr(k));
      if (r != t->model_.ids.end())
        t->model_.add_merge(l->second, r->second, static_cast<int>(id), static_cast<uint32_t>(id));
    }
  }
  const auto specials = llama3_special_tokens();
  for (size_t k = 0; k < specials.size(); ++k)
    t->added_.push_back({specials[k], static_cast<int>(n + k), true, false, false});
  PreTokenizer split;
  split.kind = PreTokenizer::kSplit;
  split.re = std::make_shared<Regex>(kLlama3Pattern, false, path);
  t->pretokenizers_.push_back(split);
  PreTokenizer bl;
  bl.kind = PreTokenizer::kByteLevel;
  t->pretokenizers_.push_back(bl);
  t->finish();
  t->resolve_specials(cfg, "<|begin_of_text|>", "<|end_of_text|>", true, false);
  const BpeTokenizer* self = t.get();
  t->make_json_ = [self] {
    // transformers' TikTokenConverter: merges of each token ordered by the ranks of the parts,
    // all ordered by the token's rank.
    struct M {
      int merged, l, r;
    };
    std::vector<M> ms;
    for (const auto& [key, value] : self->model_.merges)
      ms.push_back({static_cast<int>(value & 0xFFFFFFFFu), static_cast<int>(key >> 32),
                    static_cast<int>(key & 0xFFFFFFFFu)});
    std::sort(ms.begin(), ms.end(), [](const M& a, const M& b) {
      return std::tie(a.merged, a.l, a.r) < std::tie(b.merged, b.l, b.r);
    });
    Json merges = Json::array();
    for (const auto& m : ms)
      merges.push_back(self->file_pieces_[static_cast<size_t>(m.l)] + " " +
                       self->file_pieces_[static_cast<size_t>(m.r)]);
    const Json pre = {
        {"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"}, {"pattern", {{"Regex", kLlama3Pattern}}}, {"behavior", "Isolated"},
           {"invert", false}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
           {"use_regex", false}}}}};
    return byte_level_json(*self, merges, pre, true);
  };
  return t;
}

// =============================================================================================
// tokenizer.json for sentencepiece-style vocabularies

std::string spm_style_tokenizer_json(const std::vector<SpmPiece>& pieces, int bos_id,
                                     bool add_bos) {
  std::unordered_map<std::string, int> ids;
  for (size_t i = 0; i < pieces.size(); ++i) ids.emplace(pieces[i].text, static_cast<int>(i));
  auto mergeable = [&](int id) {
    const auto k = pieces[static_cast<size_t>(id)].kind;
    return k == SpmPiece::kNormal || k == SpmPiece::kUserDefined;
  };
  // transformers' SentencePieceExtractor: every split of a piece into two pieces, ordered by
  // the piece's score (higher first), then by the parts' ids.
  struct M {
    float score;
    int merged, l, r;
  };
  std::vector<M> ms;
  for (size_t i = 0; i < pieces.size(); ++i) {
    if (!mergeable(static_cast<int>(i))) continue;
    const std::string& p = pieces[i].text;
    for (size_t k = utf8_char_len(p, 0); k < p.size(); k += utf8_char_len(p, k)) {
      auto l = ids.find(p.substr(0, k));
      auto r = ids.find(p.substr(k));
      if (l != ids.end() && r != ids.end() && mergeable(l->second) && mergeable(r->second))
        ms.push_back({pieces[i].score, static_cast<int>(i), l->second, r->second});
    }
  }
  std::sort(ms.begin(), ms.end(), [](const M& a, const M& b) {
    if (a.score != b.score) return a.score > b.score;
    return std::tie(a.merged, a.l, a.r) < std::tie(b.merged, b.l, b.r);
  });
  HfBpeDocument d;
  std::string unk;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const auto& p = pieces[i];
    d.vocab[p.text] = i;
    if (p.kind == SpmPiece::kByte) d.byte_fallback = true;
    if (p.kind == SpmPiece::kUnknown && unk.empty()) unk = p.text;
    if (p.kind == SpmPiece::kUnknown || p.kind == SpmPiece::kControl ||
        p.kind == SpmPiece::kUserDefined)
      d.added.push_back(added_token_json(static_cast<int>(i), p.text,
                                         p.kind != SpmPiece::kUserDefined,
                                         p.kind == SpmPiece::kUserDefined));
  }
  for (const auto& m : ms)
    d.merges.push_back(pieces[static_cast<size_t>(m.l)].text + " " +
                       pieces[static_cast<size_t>(m.r)].text);
  d.normalizer = {{"type", "Sequence"},
                  {"normalizers",
                   {{{"type", "Prepend"}, {"prepend", kSpmSpace}},
                    {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kSpmSpace}}}}};
  if (add_bos && bos_id >= 0)
    d.post_processor = bos_template(pieces[static_cast<size_t>(bos_id)].text, bos_id);
  d.decoder = {{"type", "Sequence"},
               {"decoders",
                {{{"type", "Replace"}, {"pattern", {{"String", kSpmSpace}}}, {"content", " "}},
                 {{"type", "ByteFallback"}},
                 {{"type", "Fuse"}},
                 {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
  if (!unk.empty()) d.unk_token = unk;
  d.fuse_unk = true;
  return d.dump();
}

}  // namespace qtune::tok
