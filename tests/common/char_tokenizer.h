// A tokenizer for exact expectations in data and chat-template tests: one token per byte
// (id = byte + 3), BOS = 1, EOS = 2; optionally with the dummy-prefix space sentencepiece and
// llama2.c put in front of non-empty text.
#pragma once

#include <string>
#include <vector>

#include "qtune/tokenizer.h"

namespace qtune::test {

class CharTokenizer : public Tokenizer {
 public:
  explicit CharTokenizer(bool dummy_prefix = false) : dummy_prefix_(dummy_prefix) {}
  int64_t vocab_size() const override { return 259; }
  int bos_id() const override { return 1; }
  int eos_id() const override { return 2; }
  std::vector<int> encode(const std::string& text, bool bos, bool eos) const override {
    std::vector<int> ids;
    if (bos) ids.push_back(1);
    if (dummy_prefix_ && !text.empty()) ids.push_back(' ' + 3);
    for (unsigned char c : text) ids.push_back(c + 3);
    if (eos) ids.push_back(2);
    return ids;
  }
  std::string decode_token(int, int token) const override {
    return token >= 3 ? std::string(1, static_cast<char>(token - 3)) : std::string();
  }

 private:
  bool dummy_prefix_;
};

/// Ids written as text: bytes as themselves, BOS as '^', EOS as '$'.
template <typename Id>
std::string chars(const std::vector<Id>& ids) {
  std::string s;
  for (Id id : ids) s += id >= 3 ? static_cast<char>(id - 3) : (id == 1 ? '^' : '$');
  return s;
}

}  // namespace qtune::test
