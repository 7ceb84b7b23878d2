// Tokenizers: llama2.c tok*.bin (BPE by merge score, exactly as run.c's encode/decode) and
// sentencepiece .model files (through the dlopen()ed libqtune_sentencepiece.so, see
// core/spm/qtune_spm.h for why it is not linked), and load_tokenizer(), which picks the format
// (the BPE formats are in bpe_tokenizer.cpp).
#include "qtune/tokenizer.h"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "../spm/qtune_spm.h"
#include "qtune/error.h"
#include "tokenizer_internal.h"
#include "text_util.h"

namespace fs = std::filesystem;

namespace qtune {

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::string out;
  int prev = -1;
  for (int id : ids) {
    if (id != bos_id() && id != eos_id()) out += decode_token(prev, id);
    prev = id;
  }
  return out;
}

int Tokenizer::token_to_id(const std::string&) const { return -1; }

bool Tokenizer::is_special(int id) const { return id >= 0 && (id == bos_id() || id == eos_id()); }

std::string Tokenizer::to_hf_json() const {
  throw UserError("this tokenizer cannot be written as a Hugging Face tokenizer.json");
}

namespace {

// tokenizer_config.json over the fixed specials of the sentencepiece-style formats: the ids stay
// the model's, the config adds add_bos/eos, pad and the chat template.
TokenizerConfig merge_config(const tok::ConfigFile& f, const std::string& bos,
                             const std::string& eos, const std::string& unk,
                             const Tokenizer& t) {
  TokenizerConfig c = f.config;
  if (!f.has_bos_token) c.bos_token = bos;
  if (!f.has_eos_token) c.eos_token = eos;
  if (c.unk_token.empty()) c.unk_token = unk;
  if (!c.pad_token.empty()) {
    c.pad_id = t.token_to_id(c.pad_token);
    QTUNE_CHECK(c.pad_id >= 0, f.config.path, ": pad_token \"", c.pad_token,
                "\" is not a token of the tokenizer beside it");
  }
  return c;
}

using detail::ends_with;

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

// "<0xNN>" -> NN, else -1 (run.c's sscanf(piece, "<0x%02hhX>") test, made strict).
int byte_piece_value(const std::string& p) {
  if (p.size() != 6 || p.compare(0, 3, "<0x") != 0 || p[5] != '>') return -1;
  int hi = hex_value(p[3]), lo = hex_value(p[4]);
  return (hi < 0 || lo < 0) ? -1 : hi * 16 + lo;
}

// ---------------------------------------------------------------------------------------------
// llama2.c tok*.bin

class Llama2cTokenizer : public Tokenizer {
 public:
  Llama2cTokenizer(const std::string& path, const tok::ConfigFile& config) : path_(path) {
    std::ifstream in(path, std::ios::binary);
    QTUNE_CHECK(in.good(), "cannot open tokenizer ", path);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string data = ss.str();
    QTUNE_CHECK(data.size() >= 4, "llama2.c tokenizer ", path, " is ", data.size(),
                " bytes, too short for its max_token_length header");
    int32_t max_len = 0;
    std::memcpy(&max_len, data.data(), 4);
    QTUNE_CHECK(max_len > 0 && max_len < (1 << 16), "llama2.c tokenizer ", path,
                ": max_token_length = ", max_len, ", expected 1..65535");
    // The vocabulary size is not stored: entries run to the end of the file.
    size_t pos = 4;
    while (pos < data.size()) {
      const size_t id = pieces_.size();
      QTUNE_CHECK(data.size() - pos >= 8, "llama2.c tokenizer ", path, ": entry ", id, " at byte ",
                  pos, " is truncated (need 8 bytes for score and length, have ", data.size() - pos,
                  ")");
      float score;
      int32_t len;
      std::memcpy(&score, data.data() + pos, 4);
      std::memcpy(&len, data.data() + pos + 4, 4);
      pos += 8;
      QTUNE_CHECK(len >= 0 && len <= max_len, "llama2.c tokenizer ", path, ": entry ", id,
                  " has length ", len, ", expected 0..max_token_length = ", max_len);
      QTUNE_CHECK(data.size() - pos >= static_cast<size_t>(len), "llama2.c tokenizer ", path,
                  ": entry ", id, " at byte ", pos - 8, " is truncated (needs ", len,
                  " bytes, file has ", data.size() - pos, " left)");
      pieces_.emplace_back(data.data() + pos, static_cast<size_t>(len));
      scores_.push_back(score);
      pos += static_cast<size_t>(len);
    }
    QTUNE_CHECK(pieces_.size() >= 3, "llama2.c tokenizer ", path, " has ", pieces_.size(),
                " tokens, expected at least 3 (<unk>, BOS, EOS)");
    // run.c finds pieces with bsearch over a sorted copy; for duplicate pieces (none in the
    // known files) the lowest id wins here.
    lookup_.reserve(pieces_.size() * 2);
    for (size_t i = 0; i < pieces_.size(); ++i) lookup_.emplace(pieces_[i], static_cast<int>(i));
    auto sp = lookup_.find(" ");
    space_id_ = sp == lookup_.end() ? -1 : sp->second;
    // The export renames sentencepiece's <s>/</s> to "\n<s>\n"/"\n</s>\n"; HF files use these.
    config_ = merge_config(config, "<s>", "</s>", "<unk>", *this);
  }

  int token_to_id(const std::string& piece) const override {
    if (piece == "<unk>") return 0;
    if (piece == "<s>") return 1;
    if (piece == "</s>") return 2;
    auto it = lookup_.find(piece);
    return it == lookup_.end() ? -1 : it->second;
  }

  // As a sentencepiece-style tokenizer.json: spaces as U+2581, ids 0..2 as <unk>, <s>, </s>.
  std::string to_hf_json() const override {
    std::vector<tok::SpmPiece> pieces(pieces_.size());
    for (size_t i = 0; i < pieces_.size(); ++i) {
      auto& p = pieces[i];
      p.score = scores_[i];
      if (i < 3) {
        p.text = i == 0 ? "<unk>" : i == 1 ? "<s>" : "</s>";
        p.kind = i == 0 ? tok::SpmPiece::kUnknown : tok::SpmPiece::kControl;
        continue;
      }
      p.kind = byte_piece_value(pieces_[i]) >= 0 ? tok::SpmPiece::kByte : tok::SpmPiece::kNormal;
      for (char ch : pieces_[i]) p.text += ch == ' ' ? std::string("\xE2\x96\x81") : std::string(1, ch);
    }
    return tok::spm_style_tokenizer_json(pieces, 1, config_.add_bos_token);
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(pieces_.size()); }
  int bos_id() const override { return 1; }
  int eos_id() const override { return 2; }

  // run.c's encode(): dummy prefix, codepoints (or bytes + 3), then repeatedly merge the
  // adjacent pair whose concatenation is a piece of the highest score (leftmost on ties). run.c
  // rescans all pairs per merge (quadratic); this keeps candidates in a priority queue ordered by
  // (score desc, position asc), which picks the same pair at every step because merging keeps
  // the symbols' relative order. tests/core/test_tokenizer.cpp checks it against a literal
  // transcription of run.c.
  std::vector<int> encode(const std::string& text, bool bos, bool eos) const override {
    std::vector<int> ids;
    ids.reserve(text.size() + 3);
    if (bos) ids.push_back(1);
    if (!text.empty()) {
      QTUNE_CHECK(space_id_ >= 0, "llama2.c tokenizer ", path_,
                  " has no \" \" piece for the dummy prefix");
      ids.push_back(space_id_);
    }
    std::string cp;
    for (size_t k = 0; k < text.size(); ++k) {
      const unsigned char c = static_cast<unsigned char>(text[k]);
      if ((c & 0xC0) != 0x80) cp.clear();
      cp.push_back(static_cast<char>(c));
      const unsigned char next = k + 1 < text.size() ? static_cast<unsigned char>(text[k + 1]) : 0;
      if ((next & 0xC0) == 0x80 && cp.size() < 4) continue;
      auto it = lookup_.find(cp);
      if (it != lookup_.end()) {
        ids.push_back(it->second);
      } else {
        for (unsigned char b : cp) {
          const int id = static_cast<int>(b) + 3;
          QTUNE_CHECK(id < vocab_size(), "llama2.c tokenizer ", path_, " has ", vocab_size(),
                      " tokens, too few for byte fallback of byte ", static_cast<int>(b));
          ids.push_back(id);
        }
      }
      cp.clear();
    }
    merge(ids);
    if (eos) ids.push_back(2);
    return ids;
  }

  std::string decode_token(int prev, int token) const override {
    QTUNE_CHECK(token >= 0 && token < vocab_size(), "token id ", token,
                " is outside the vocabulary [0, ", vocab_size(), ") of ", path_);
    const std::string& p = pieces_[static_cast<size_t>(token)];
    // After BOS, sentencepiece strips the leading space (llama2.c PR #89).
    if (prev == 1 && !p.empty() && p[0] == ' ') return p.substr(1);
    int b = byte_piece_value(p);
    if (b >= 0) return std::string(1, static_cast<char>(b));
    return p;
  }

 private:
  // run.c: the pair whose concatenation is a piece of the highest score (above -1e10) merges.
  void merge(std::vector<int>& ids) const {
    std::string buf;
    tok::merge_pairs<float>(ids, [&](int l, int r, float& key, int& merged) {
      buf = pieces_[static_cast<size_t>(l)];
      buf += pieces_[static_cast<size_t>(r)];
      auto it = lookup_.find(buf);
      if (it == lookup_.end() || !(scores_[static_cast<size_t>(it->second)] > -1e10f)) return false;
      key = -scores_[static_cast<size_t>(it->second)];
      merged = it->second;
      return true;
    });
  }

  std::string path_;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> lookup_;
  int space_id_ = -1;
};

// ---------------------------------------------------------------------------------------------
// sentencepiece, through the dlopen()ed module

struct SpmApi {
  int (*abi_version)();
  QtuneSpm* (*load)(const char*, char*, size_t);
  void (*free_)(QtuneSpm*);
  int (*piece_size)(const QtuneSpm*);
  int (*bos_id)(const QtuneSpm*);
  int (*eos_id)(const QtuneSpm*);
  int (*unk_id)(const QtuneSpm*);
  const char* (*id_to_piece)(const QtuneSpm*, int, size_t*);
  float (*score)(const QtuneSpm*, int);
  int (*piece_type)(const QtuneSpm*, int);
  int (*encode)(const QtuneSpm*, const char*, size_t, void (*)(void*, const int*, size_t), void*,
                char*, size_t);
};

// The directory holding libqtune_core.so (the wrapper is installed beside it).
std::string core_library_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&load_tokenizer), &info) == 0 || !info.dli_fname) return "";
  return fs::path(info.dli_fname).parent_path().string();
}

// dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND). Under AddressSanitizer (the
// QTUNE_SANITIZE build) the dlopen the process sees is ASan's interceptor, which refuses
// RTLD_DEEPBIND outright (a deep-bound library would call libc's malloc instead of ASan's). The
// module is built uninstrumented there and frees what it allocates itself, so libc's own dlopen
// (the next definition after this library) is called instead.
void* deepbind_dlopen(const char* path) {
  constexpr int kFlags = RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND;
#ifdef QTUNE_SANITIZE
  using Dlopen = void* (*)(const char*, int);
  if (auto real = reinterpret_cast<Dlopen>(dlsym(RTLD_NEXT, "dlopen"))) return real(path, kFlags);
#endif
  return dlopen(path, kFlags);
}

const SpmApi& spm_api() {
  static std::once_flag once;
  static SpmApi api{};
  static std::string error;
  std::call_once(once, [] {
    const char* env = std::getenv("QTUNE_SENTENCEPIECE_LIBRARY");
    const std::string path =
        env && *env ? std::string(env)
                    : (fs::path(core_library_dir()) / "libqtune_sentencepiece.so").string();
    // RTLD_DEEPBIND: the module and libsentencepiece (which exports its bundled protobuf-lite)
    // bind to their own symbols before the process's global ones (LibTorch's libprotobuf).
    // Never closed.
    void* h = deepbind_dlopen(path.c_str());
    if (!h) {
      const char* e = dlerror();
      error = "sentencepiece support unavailable: cannot load " + path + " (" +
              (e ? e : "unknown error") +
              "); it is built with libsentencepiece-dev installed and must sit beside "
              "libqtune_core.so (or set QTUNE_SENTENCEPIECE_LIBRARY)";
      return;
    }
    auto sym = [&](const char* name) -> void* {
      void* p = dlsym(h, name);
      if (!p && error.empty()) error = path + " lacks symbol " + name;
      return p;
    };
    api.abi_version = reinterpret_cast<int (*)()>(sym("qtune_spm_abi_version"));
    api.load = reinterpret_cast<decltype(api.load)>(sym("qtune_spm_load"));
    api.free_ = reinterpret_cast<decltype(api.free_)>(sym("qtune_spm_free"));
    api.piece_size = reinterpret_cast<decltype(api.piece_size)>(sym("qtune_spm_piece_size"));
    api.bos_id = reinterpret_cast<decltype(api.bos_id)>(sym("qtune_spm_bos_id"));
    api.eos_id = reinterpret_cast<decltype(api.eos_id)>(sym("qtune_spm_eos_id"));
    api.unk_id = reinterpret_cast<decltype(api.unk_id)>(sym("qtune_spm_unk_id"));
    api.id_to_piece = reinterpret_cast<decltype(api.id_to_piece)>(sym("qtune_spm_id_to_piece"));
    api.score = reinterpret_cast<decltype(api.score)>(sym("qtune_spm_score"));
    api.piece_type = reinterpret_cast<decltype(api.piece_type)>(sym("qtune_spm_piece_type"));
    api.encode = reinterpret_cast<decltype(api.encode)>(sym("qtune_spm_encode"));
    if (error.empty() && api.abi_version() != QTUNE_SPM_ABI_VERSION)
      error = path + " has C ABI version " + std::to_string(api.abi_version()) +
              ", this libqtune_core expects " + std::to_string(QTUNE_SPM_ABI_VERSION) +
              " (rebuild/reinstall qtune)";
  });
  QTUNE_CHECK(error.empty(), error);
  return api;
}

class SentencePieceTokenizer : public Tokenizer {
 public:
  SentencePieceTokenizer(const std::string& path, const tok::ConfigFile& config)
      : path_(path), api_(spm_api()), handle_(nullptr, api_.free_) {
    char err[512] = {0};
    handle_.reset(api_.load(path.c_str(), err, sizeof(err)));
    QTUNE_CHECK(handle_ != nullptr, "cannot load sentencepiece model ", path, ": ", err);
    const int n = api_.piece_size(handle_.get());
    bos_ = api_.bos_id(handle_.get());
    eos_ = api_.eos_id(handle_.get());
    // Decoded text of every piece, computed once (what decode_token returns when not after BOS).
    pieces_.resize(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      size_t len = 0;
      const char* p = api_.id_to_piece(handle_.get(), i, &len);
      std::string piece(p, len);
      const int type = api_.piece_type(handle_.get(), i);
      raw_.push_back(tok::SpmPiece{piece, api_.score(handle_.get(), i),
                                   type == QTUNE_SPM_UNKNOWN        ? tok::SpmPiece::kUnknown
                                   : type == QTUNE_SPM_CONTROL      ? tok::SpmPiece::kControl
                                   : type == QTUNE_SPM_BYTE         ? tok::SpmPiece::kByte
                                   : type == QTUNE_SPM_USER_DEFINED ? tok::SpmPiece::kUserDefined
                                                                    : tok::SpmPiece::kNormal});
      ids_.emplace(piece, i);
      std::string& out = pieces_[static_cast<size_t>(i)];
      if (type == QTUNE_SPM_CONTROL) {
        out.clear();  // <s>, </s>: no text
      } else if (type == QTUNE_SPM_BYTE && byte_piece_value(piece) >= 0) {
        out = std::string(1, static_cast<char>(byte_piece_value(piece)));
      } else {
        // U+2581 LOWER ONE EIGHTH BLOCK is sentencepiece's visible space.
        static const std::string kSpace = "\xE2\x96\x81";
        for (size_t k = 0; k < piece.size();) {
          if (piece.compare(k, kSpace.size(), kSpace) == 0) {
            out += ' ';
            k += kSpace.size();
          } else {
            out += piece[k++];
          }
        }
      }
    }
    const int unk = api_.unk_id(handle_.get());
    config_ = merge_config(config, bos_ >= 0 ? raw_[static_cast<size_t>(bos_)].text : "",
                           eos_ >= 0 ? raw_[static_cast<size_t>(eos_)].text : "",
                           unk >= 0 ? raw_[static_cast<size_t>(unk)].text : "", *this);
  }
  int64_t vocab_size() const override { return static_cast<int64_t>(pieces_.size()); }
  int bos_id() const override { return bos_; }
  int eos_id() const override { return eos_; }

  std::vector<int> encode(const std::string& text, bool bos, bool eos) const override {
    std::vector<int> ids;
    if (bos) {
      QTUNE_CHECK(bos_ >= 0, "sentencepiece model ", path_, " has no BOS token");
      ids.push_back(bos_);
    }
    char err[512] = {0};
    auto sink = [](void* ctx, const int* p, size_t n) {
      static_cast<std::vector<int>*>(ctx)->insert(static_cast<std::vector<int>*>(ctx)->end(), p,
                                                  p + n);
    };
    int rc = api_.encode(handle_.get(), text.data(), text.size(), sink, &ids, err, sizeof(err));
    QTUNE_CHECK(rc == 0, "sentencepiece encode with ", path_, " failed: ", err);
    if (eos) {
      QTUNE_CHECK(eos_ >= 0, "sentencepiece model ", path_, " has no EOS token");
      ids.push_back(eos_);
    }
    return ids;
  }

  std::string decode_token(int prev, int token) const override {
    QTUNE_CHECK(token >= 0 && token < vocab_size(), "token id ", token,
                " is outside the vocabulary [0, ", vocab_size(), ") of ", path_);
    const std::string& p = pieces_[static_cast<size_t>(token)];
    if (prev == bos_ && bos_ >= 0 && !p.empty() && p[0] == ' ') return p.substr(1);
    return p;
  }

  int token_to_id(const std::string& piece) const override {
    auto it = ids_.find(piece);
    return it == ids_.end() ? -1 : it->second;
  }
  bool is_special(int id) const override {
    return id >= 0 && id < vocab_size() &&
           (raw_[static_cast<size_t>(id)].kind == tok::SpmPiece::kControl ||
            raw_[static_cast<size_t>(id)].kind == tok::SpmPiece::kUnknown);
  }
  std::string to_hf_json() const override {
    return tok::spm_style_tokenizer_json(raw_, bos_, config_.add_bos_token);
  }

 private:
  std::string path_;
  const SpmApi& api_;
  // Owned from the load on, so a constructor that throws after it (a malformed model) frees it.
  std::unique_ptr<QtuneSpm, void (*)(QtuneSpm*)> handle_;
  int bos_ = -1, eos_ = -1;
  std::vector<std::string> pieces_;
  std::vector<tok::SpmPiece> raw_;  // the model's own pieces, scores and types
  std::unordered_map<std::string, int> ids_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  std::error_code ec;
  QTUNE_CHECK(fs::is_regular_file(path, ec), "tokenizer file ", path, " does not exist");
  const std::string name = fs::path(path).filename().string();
  const tok::ConfigFile config = tok::read_tokenizer_config(path);
  // The first bytes tell a tiktoken rank file from a sentencepiece protobuf (both are called
  // tokenizer.model) and a tokenizer.json from a GPT-2 vocab.json.
  std::string head(256, '\0');
  {
    std::ifstream in(path, std::ios::binary);
    in.read(head.data(), static_cast<std::streamsize>(head.size()));
    head.resize(static_cast<size_t>(in.gcount()));
  }
  if (ends_with(name, ".tiktoken") || (ends_with(name, ".model") && tok::looks_like_tiktoken(head)))
    return tok::load_tiktoken(path, config);
  if (ends_with(name, ".model")) return std::make_unique<SentencePieceTokenizer>(path, config);
  if (ends_with(name, ".bin")) return std::make_unique<Llama2cTokenizer>(path, config);
  if (ends_with(name, ".json") && name.find("vocab") != std::string::npos &&
      head.find("\"model\"") == std::string::npos) {
    // GPT-2 style: merges.txt beside it (HF's names), or the same name with vocab -> merges.
    std::string alt = name.substr(0, name.size() - 5);
    alt.replace(alt.find("vocab"), 5, "merges");
    alt += ".txt";
    const fs::path dir = fs::path(path).parent_path();
    for (const std::string& m : {alt, std::string("merges.txt")})
      if (fs::is_regular_file(dir / m, ec)) return tok::load_gpt2_vocab_merges(path, (dir / m).string(), config);
    throw UserError("tokenizer " + path + ": a GPT-2 style vocab.json needs its merges beside it (" +
                    (dir / alt).string() + " or " + (dir / "merges.txt").string() + "), found neither");
  }
  if (ends_with(name, ".json")) return tok::load_hf_tokenizer_json(path, config);
  throw UserError("tokenizer " + path +
                  ": unknown kind, expected a tokenizer.json, a GPT-2 vocab.json (+ merges.txt), "
                  "a sentencepiece or tiktoken .model, a .tiktoken or a llama2.c .bin file");
}

}  // namespace qtune
