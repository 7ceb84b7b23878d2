// Tokenizers behind one interface: llama2.c tok*.bin, sentencepiece .model, Hugging Face
// tokenizer.json (byte-level and sentencepiece-style BPE), GPT-2 vocab.json + merges.txt and
// tiktoken rank files (Llama 3's original tokenizer.model). See docs/formats.md.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "qtune/export.h"

namespace qtune {

/// What a Hugging Face `tokenizer_config.json` beside the tokenizer file says, completed with the
/// format's own defaults when the file (or a key) is absent.
struct TokenizerConfig {
  std::string path;  ///< the tokenizer_config.json that was read, "" when there was none
  std::string bos_token, eos_token, pad_token, unk_token;  ///< token text, "" when none
  int pad_id = -1;             ///< id of pad_token, -1 when none
  bool add_bos_token = true;   ///< whether the model's own pipeline puts BOS in front
  bool add_eos_token = false;  ///< whether it puts EOS behind
  std::string chat_template;   ///< Jinja source of the chat template, "" when none
};

class QTUNE_API Tokenizer {
 public:
  virtual ~Tokenizer();
  virtual int64_t vocab_size() const = 0;
  /// BOS/EOS ids, -1 when the tokenizer has none (e.g. Qwen2 has no BOS).
  virtual int bos_id() const = 0;
  virtual int eos_id() const = 0;
  /// Token ids of `text`, with BOS in front (when the tokenizer has one) and/or EOS behind when
  /// asked. Sentencepiece-style vocabularies (llama2.c, .model, Metaspace/Prepend tokenizer.json)
  /// add a leading space to non-empty text ("add dummy prefix"); byte-level ones do not. Added
  /// and special tokens spelled in `text` (tokenizer.json, tiktoken) become their ids.
  virtual std::vector<int> encode(const std::string& text, bool bos, bool eos) const = 0;
  /// The text (bytes) of one token following `prev` (-1 at the start): llama2.c's rule, after
  /// BOS a leading space is dropped in sentencepiece-style vocabularies; byte tokens <0xNN>
  /// become the raw byte; special tokens give their text.
  virtual std::string decode_token(int prev, int token) const = 0;
  /// Concatenated decode_token over `ids` (skipping BOS/EOS).
  std::string decode(const std::vector<int>& ids) const;
  /// The id of the token spelled `piece` in the tokenizer file (an added/special token such as
  /// "<|eot_id|>", or a vocabulary entry as the file writes it: "▁the", "Ġthe"), -1 if none.
  virtual int token_to_id(const std::string& piece) const;
  /// Whether `id` is a special (control) token such as BOS, EOS or <|eot_id|>.
  virtual bool is_special(int id) const;
  /// tokenizer_config.json facts (BOS/EOS/pad text, add_bos/eos, chat template).
  const TokenizerConfig& config() const { return config_; }
  /// The tokenizer as the text of an HF tokenizer.json that the `tokenizers` library loads and
  /// that gives the same ids. Throws UserError for a tokenizer that cannot be expressed so.
  virtual std::string to_hf_json() const;

 protected:
  TokenizerConfig config_;
};

/// Loads a tokenizer, choosing the format by name and content: `tokenizer.json` (any `*.json`
/// with a "model" object), `vocab.json` with `merges.txt` beside it (GPT-2 style), `.model`
/// (sentencepiece protobuf, or tiktoken `base64 rank` lines), `.tiktoken`, `.bin` (llama2.c).
/// A `tokenizer_config.json` in the same folder is read too. Throws UserError naming the path
/// when it is missing, of an unknown kind, or malformed.
QTUNE_API std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);

/// Writes `dir`/tokenizer.json (to_hf_json()) and `dir`/tokenizer_config.json (the keys of the
/// config file read with the tokenizer, if any, with its tokens, add_bos/eos and chat template
/// set; tokenizer_class PreTrainedTokenizerFast), atomically.
QTUNE_API void save_hf_tokenizer(const Tokenizer& tokenizer, const std::string& dir);

/// The tokenizer of an HF directory being written: a sentencepiece or tiktoken `.model` is kept
/// as `dir`/tokenizer.model and a llama2.c `.bin` as `dir`/tokenizer.bin (byte copies), and every
/// format also gets save_hf_tokenizer(), so other tools can build the vocabulary.
QTUNE_API void save_tokenizer_files(const std::string& tokenizer_path, const std::string& dir);

}  // namespace qtune
