// Tokenizers: sentencepiece .model files and llama2.c tok*.bin files behind one interface.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "qtune/export.h"

namespace qtune {

class QTUNE_API Tokenizer {
 public:
  virtual ~Tokenizer();
  virtual int64_t vocab_size() const = 0;
  virtual int bos_id() const = 0;
  virtual int eos_id() const = 0;
  /// Token ids of `text`, with BOS in front and/or EOS behind when asked. Like llama2.c and
  /// sentencepiece's Llama setup, a leading space is added to non-empty text ("add dummy prefix").
  virtual std::vector<int> encode(const std::string& text, bool bos, bool eos) const = 0;
  /// The text of one token following `prev` (llama2.c's rule: after BOS a leading space is
  /// dropped; byte tokens <0xNN> become the raw byte).
  virtual std::string decode_token(int prev, int token) const = 0;
  /// Concatenated decode_token over `ids` (skipping BOS/EOS).
  std::string decode(const std::vector<int>& ids) const;
};

/// Loads by extension: `.model` -> sentencepiece, `.bin` -> llama2.c. Throws UserError naming
/// the path when it is missing or malformed.
QTUNE_API std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);

}  // namespace qtune
