// Chat templates in C++: the prompt formats of the model families qtune trains (Llama 2 chat,
// Llama 3 instruct, ChatML, Qwen2, Mistral instruct, Zephyr) and the Stanford Alpaca prompt,
// rendered piece by piece so the data pipeline knows which tokens belong to the assistant (the
// ones the loss counts). Each built-in renders exactly the text that transformers renders from
// the model's Jinja `chat_template` (jinja2 with trim_blocks and lstrip_blocks); a model's
// template string is recognised by comparing it with the real strings those models ship, not by
// interpreting Jinja.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qtune/export.h"

namespace qtune {

class Tokenizer;

/// One turn. `role` is "system", "user" or "assistant" (a data set's own role names are mapped to
/// these before rendering); `content` is UTF-8 text.
struct ChatMessage {
  std::string role;
  std::string content;
};
using Conversation = std::vector<ChatMessage>;

/// One piece of a rendered conversation, in order.
struct ChatPiece {
  enum class Kind {
    kText,     ///< literal text
    kBos,      ///< the template's bos_token (the tokenizer's BOS id)
    kEos,      ///< the template's eos_token (the tokenizer's EOS id)
    kSpecial,  ///< a control token such as "<|eot_id|>" or "<|im_start|>" (text = its string)
  };
  Kind kind = Kind::kText;
  std::string text;        ///< kText / kSpecial: the characters; empty for kBos / kEos
  bool assistant = false;  ///< produced by the assistant: its content and its end of turn
  bool end_of_turn = false;  ///< the token that closes an assistant turn (a stop token)
};

/// A conversation as token ids; `assistant[i]` says whether ids[i] is one the model learns to
/// produce (ChatPiece::assistant). Both vectors have the same length.
struct ChatTokens {
  std::vector<int> ids;
  std::vector<uint8_t> assistant;
};

/// A built-in chat template. Cheap to copy.
class QTUNE_API ChatTemplate {
 public:
  /// The built-in called `name` (see builtin_names()). Throws UserError naming `key` and listing
  /// the built-ins for any other name.
  static ChatTemplate builtin(const std::string& name, const std::string& key = "data.template");
  /// The built-in that renders what the Jinja `source` (a tokenizer_config.json chat_template
  /// value, decoded) renders. Only the real template strings of the supported model families are
  /// recognised; any other string throws UserError naming `origin` and asking for
  /// data.template with the closest built-in's name when its family is evident.
  static ChatTemplate from_jinja(const std::string& source, const std::string& origin);
  /// "llama2", "llama3", "chatml", "qwen2", "mistral", "mistral_v1", "zephyr", "alpaca".
  static std::vector<std::string> builtin_names();

  const std::string& name() const { return name_; }
  /// The bos_token / eos_token strings of the family's tokenizer_config.json ("<s>", "</s>";
  /// "<|begin_of_text|>", "<|eot_id|>"; "" where the template never uses one).
  const std::string& bos_token() const { return bos_token_; }
  const std::string& eos_token() const { return eos_token_; }

  /// The pieces of `conversation`, followed by the opening of an assistant turn when
  /// add_generation_prompt and the template has one. Throws UserError with the template's own
  /// message (e.g. "conversation roles must alternate user/assistant/...") for a conversation
  /// the real template refuses, and for an empty conversation or a role other than
  /// system/user/assistant.
  std::vector<ChatPiece> render(const Conversation& conversation,
                                bool add_generation_prompt) const;
  /// The rendered text: the pieces concatenated, kBos/kEos written as `bos_token`/`eos_token`
  /// (what jinja2 renders with those token strings).
  std::string render_text(const Conversation& conversation, bool add_generation_prompt,
                          const std::string& bos_token, const std::string& eos_token) const;
  /// render_text with this family's own bos_token()/eos_token().
  std::string render_text(const Conversation& conversation, bool add_generation_prompt) const {
    return render_text(conversation, add_generation_prompt, bos_token_, eos_token_);
  }

  /// Token ids of the rendered conversation. kBos/kEos become tokenizer.bos_id()/eos_id() (so
  /// the tokenizer's own BOS is never added on top: BOS appears exactly where the template puts
  /// it); a kSpecial the tokenizer has no single id for is encoded as its text. Runs of text
  /// with the same `assistant` flag are encoded together with encode(text, false, false); where
  /// such a run continues text directly (an assistant answer after its prompt) and the
  /// tokenizer adds a dummy-prefix space, one leading space of the run is dropped, since the
  /// dummy prefix stands for it. An assistant turn whose end_of_turn piece is not the
  /// tokenizer's EOS is followed by EOS (also assistant), so every answer ends in a token
  /// generation stops at.
  ChatTokens encode(const Conversation& conversation, bool add_generation_prompt,
                    const Tokenizer& tokenizer) const;
  /// Ids that end an assistant turn in encode()'s output: the tokenizer's EOS, and the
  /// template's end-of-turn token ("<|eot_id|>", "<|im_end|>") when the tokenizer has it.
  std::vector<int> stop_ids(const Tokenizer& tokenizer) const;

 private:
  enum class Family { kLlama2, kLlama3, kChatml, kQwen2, kMistral, kMistralV1, kZephyr, kAlpaca };
  ChatTemplate(Family family, std::string name, std::string bos, std::string eos);
  Family family_;
  std::string name_, bos_token_, eos_token_;
};

/// Python's str.strip(): removes leading and trailing Unicode whitespace (what Jinja's `trim`
/// filter and `.strip()` do to the content in several templates). Invalid UTF-8 is kept.
QTUNE_API std::string python_strip(const std::string& s);

}  // namespace qtune
