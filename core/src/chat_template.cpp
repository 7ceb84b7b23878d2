// The built-in chat templates (see chat_template.h): how each family lays out a conversation,
// which pieces are the assistant's, the real Jinja strings that select them, and the encoding
// of the pieces into token ids.
#include "qtune/chat_template.h"

#include <algorithm>
#include <utility>

#include "qtune/error.h"
#include "qtune/tokenizer.h"

namespace qtune {

// ---------------------------------------------------------------------------------------------
// Python's str.strip()

namespace {

// Code points Python's str.isspace() accepts (Unicode White_Space plus the ASCII separators
// 0x1C-0x1F), i.e. what str.strip() with no argument removes.
bool python_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

// Decodes the code point starting at s[i]; sets len to its byte length (1 for invalid bytes,
// which then count as non-space).
uint32_t code_point_at(const std::string& s, size_t i, size_t& len) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  len = 1;
  if (c < 0x80) return c;
  size_t n = (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0xFFFFFFFF;
  uint32_t cp = c & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) {
    if ((b(i + k) & 0xC0) != 0x80) return 0xFFFFFFFF;
    cp = (cp << 6) | (b(i + k) & 0x3F);
  }
  len = n;
  return cp;
}

}  // namespace

std::string python_strip(const std::string& s) {
  size_t begin = 0, len = 0;
  while (begin < s.size() && python_space(code_point_at(s, begin, len))) begin += len;
  // Scan forward, remembering where the last non-space code point ends.
  size_t end = begin;
  for (size_t i = begin; i < s.size(); i += len)
    if (!python_space(code_point_at(s, i, len))) end = i + len;
  return s.substr(begin, end - begin);
}

// ---------------------------------------------------------------------------------------------
// Rendering

namespace {

using Kind = ChatPiece::Kind;

// Stanford Alpaca's no-input preamble (tatsu-lab/stanford_alpaca train.py PROMPT_DICT), the
// same text data.cpp's alpaca_prompt uses, so a one-turn conversation renders that prompt.
constexpr const char* kAlpacaPreamble =
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.";

class Pieces {
 public:
  void text(const std::string& t, bool assistant = false) {
    if (!t.empty()) out_.push_back({Kind::kText, t, assistant, false});
  }
  void bos() { out_.push_back({Kind::kBos, "", false, false}); }
  void eos(bool assistant = false) { out_.push_back({Kind::kEos, "", assistant, assistant}); }
  void special(const std::string& t, bool assistant = false, bool end_of_turn = false) {
    out_.push_back({Kind::kSpecial, t, assistant, end_of_turn});
  }
  std::vector<ChatPiece> take() { return std::move(out_); }

 private:
  std::vector<ChatPiece> out_;
};

// The roles a conversation may use; anything else was not mapped by the data reader.
void check_roles(const Conversation& c, const std::string& name) {
  QTUNE_CHECK(!c.empty(), name, " template: the conversation has no messages");
  for (size_t i = 0; i < c.size(); ++i)
    QTUNE_CHECK(c[i].role == "system" || c[i].role == "user" || c[i].role == "assistant", name,
                " template: message [", i, "] has role '", c[i].role,
                "', expected system, user or assistant");
}

// The check Llama 2, Mistral and our Alpaca template make on the messages after an optional
// leading system message: `(role == 'user') != (index % 2 == 0)` raises.
void check_alternation(const Conversation& c, size_t first, const std::string& name,
                       const char* message) {
  for (size_t i = first; i < c.size(); ++i)
    QTUNE_CHECK((c[i].role == "user") == ((i - first) % 2 == 0), name, " template: ", message,
                " (message [", i, "] is '", c[i].role, "')");
}

}  // namespace

ChatTemplate::ChatTemplate(Family family, std::string name, std::string bos, std::string eos)
    : family_(family), name_(std::move(name)), bos_token_(std::move(bos)), eos_token_(std::move(eos)) {}

std::vector<std::string> ChatTemplate::builtin_names() {
  return {"llama2", "llama3", "chatml", "qwen2", "mistral", "mistral_v1", "zephyr", "alpaca"};
}

ChatTemplate ChatTemplate::builtin(const std::string& name, const std::string& key) {
  if (name == "llama2") return {Family::kLlama2, name, "<s>", "</s>"};
  if (name == "llama3") return {Family::kLlama3, name, "<|begin_of_text|>", "<|eot_id|>"};
  if (name == "chatml") return {Family::kChatml, name, "", "<|im_end|>"};
  if (name == "qwen2") return {Family::kQwen2, name, "", "<|im_end|>"};
  if (name == "mistral") return {Family::kMistral, name, "<s>", "</s>"};
  if (name == "mistral_v1") return {Family::kMistralV1, name, "<s>", "</s>"};
  if (name == "zephyr") return {Family::kZephyr, name, "<s>", "</s>"};
  if (name == "alpaca") return {Family::kAlpaca, name, "<s>", "</s>"};
  std::string known;
  for (const auto& n : builtin_names()) known += (known.empty() ? "" : ", ") + n;
  throw UserError(detail::concat(key, ": unknown chat template '", name, "' (expected one of: ",
                                 known, ")"));
}

std::vector<ChatPiece> ChatTemplate::render(const Conversation& c,
                                            bool add_generation_prompt) const {
  check_roles(c, name_);
  Pieces p;
  const bool has_system = c[0].role == "system";
  const size_t first = has_system ? 1 : 0;
  const std::string system = has_system ? c[0].content : "";
  switch (family_) {
    case Family::kLlama2: {
      // meta-llama/Llama-2-7b-chat-hf: the system prompt goes inside the first [INST]; BOS
      // before every [INST]; a system message later in the conversation renders nothing.
      check_alternation(c, first, name_,
                        "Conversation roles must alternate user/assistant/user/assistant/...");
      for (size_t i = first; i < c.size(); ++i) {
        const std::string content =
            i == first && has_system ? "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + c[i].content
                                     : c[i].content;
        if (c[i].role == "user") {
          p.bos();
          p.text("[INST] " + python_strip(content) + " [/INST]");
        } else if (c[i].role == "assistant") {
          p.text(" " + python_strip(content) + " ", true);
          p.eos(true);
        }
      }
      break;
    }
    case Family::kLlama3:
      // meta-llama/Meta-Llama-3-8B-Instruct: a header per message, any role, BOS once.
      for (size_t i = 0; i < c.size(); ++i) {
        const bool a = c[i].role == "assistant";
        if (i == 0) p.bos();
        p.special("<|start_header_id|>");
        p.text(c[i].role);
        p.special("<|end_header_id|>");
        p.text("\n\n");
        p.text(python_strip(c[i].content), a);
        p.special("<|eot_id|>", a, a);
      }
      if (add_generation_prompt) {
        p.special("<|start_header_id|>");
        p.text("assistant");
        p.special("<|end_header_id|>");
        p.text("\n\n");
      }
      break;
    case Family::kChatml:
    case Family::kQwen2:
      // Qwen2-*-Instruct is ChatML with a default system prompt when the first message is not one.
      for (size_t i = 0; i < c.size(); ++i) {
        if (family_ == Family::kQwen2 && i == 0 && !has_system) {
          p.special("<|im_start|>");
          p.text("system\nYou are a helpful assistant.");
          p.special("<|im_end|>");
          p.text("\n");
        }
        const bool a = c[i].role == "assistant";
        p.special("<|im_start|>");
        p.text(c[i].role + "\n");
        p.text(c[i].content, a);
        p.special("<|im_end|>", a, a);
        p.text("\n");
      }
      if (add_generation_prompt) {
        p.special("<|im_start|>");
        p.text("assistant\n");
      }
      break;
    case Family::kMistralV1:
      // Mistral-7B-Instruct-v0.1 as released (2023): no system role, eos_token + ' ' after answers.
      p.bos();
      check_alternation(c, 0, name_,
                        "Conversation roles must alternate user/assistant/user/assistant/...");
      for (size_t i = 0; i < c.size(); ++i) {
        QTUNE_CHECK(c[i].role != "system", name_,
                    " template: Only user and assistant roles are supported! (message [", i,
                    "] is 'system'; choose data.template: mistral for a system prompt)");
        if (c[i].role == "user") {
          p.text("[INST] " + c[i].content + " [/INST]");
        } else {
          p.text(c[i].content, true);
          p.eos(true);
          p.text(" ");
        }
      }
      break;
    case Family::kMistral:
      // The later revision of the same repository: an optional system message joins the first
      // [INST]; every [INST] starts with a space.
      p.bos();
      check_alternation(c, first, name_,
                        "After the optional system message, conversation roles must alternate "
                        "user/assistant/user/assistant/...");
      for (size_t i = first; i < c.size(); ++i) {
        QTUNE_CHECK(c[i].role != "system", name_,
                    " template: Only user and assistant roles are supported, with the exception "
                    "of an initial optional system message! (message [",
                    i, "] is 'system')");
        if (c[i].role == "user") {
          p.text(i == first && has_system
                     ? " [INST] " + system + "\n\n" + c[i].content + " [/INST]"
                     : " [INST] " + c[i].content + " [/INST]");
        } else {
          p.text(" " + c[i].content, true);
          p.eos(true);
        }
      }
      break;
    case Family::kZephyr:
      // TinyLlama-1.1B-Chat-v1.0 (Zephyr layout): eos_token and a newline after every message.
      for (size_t i = 0; i < c.size(); ++i) {
        const bool a = c[i].role == "assistant";
        p.text("<|" + c[i].role + "|>\n");
        p.text(c[i].content, a);
        p.eos(a);
        p.text("\n");
        if (i + 1 == c.size() && add_generation_prompt) p.text("<|assistant|>\n");
      }
      break;
    case Family::kAlpaca:
      // Stanford Alpaca's prompt, one "### Instruction / ### Response" pair per exchange; a
      // system message replaces the preamble. The answer follows "### Response:" after a space,
      // as alpaca data is tokenised (prompt and response encoded apart).
      p.bos();
      p.text(has_system ? system : kAlpacaPreamble);
      check_alternation(c, first, name_,
                        "after the optional system message, roles must alternate user/assistant");
      for (size_t i = first; i < c.size(); ++i) {
        QTUNE_CHECK(c[i].role != "system", name_, " template: message [", i,
                    "] is 'system'; only the first message may be");
        if (c[i].role == "user") {
          p.text("\n\n### Instruction:\n" + c[i].content + "\n\n### Response:");
        } else {
          p.text(" " + c[i].content, true);
          p.eos(true);
        }
      }
      break;
  }
  return p.take();
}

std::string ChatTemplate::render_text(const Conversation& c, bool add_generation_prompt,
                                      const std::string& bos_token,
                                      const std::string& eos_token) const {
  std::string out;
  for (const auto& piece : render(c, add_generation_prompt)) {
    if (piece.kind == Kind::kBos)
      out += bos_token;
    else if (piece.kind == Kind::kEos)
      out += eos_token;
    else
      out += piece.text;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Recognising a model's template

namespace {

// The chat_template strings these models ship in tokenizer_config.json, character for
// character (../shared/data/chat_templates.json lists their sources; tests/core/
// test_chat_template.cpp checks that every entry there maps to the built-in named here).
// clang-format off
const std::vector<std::pair<const char*, const char*>>& known_templates() {
  static const std::vector<std::pair<const char*, const char*>> k = {
      // meta-llama/Llama-2-7b-chat-hf
      {"llama2",
       "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
       "{% set system_message = messages[0]['content'] %}{% else %}"
       "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
       "{% for message in loop_messages %}"
       "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
       "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
       "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
       "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
       "{% else %}{% set content = message['content'] %}{% endif %}"
       "{% if message['role'] == 'user' %}"
       "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
       "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
       "{% endif %}{% endfor %}"},
      // meta-llama/Meta-Llama-3-8B-Instruct
      {"llama3",
       "{% set loop_messages = messages %}{% for message in loop_messages %}"
       "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
       "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
       "{% endfor %}{% if add_generation_prompt %}"
       "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"},
      // mistralai/Mistral-7B-Instruct-v0.1
      {"mistral_v1",
       "{{ bos_token }}{% for message in messages %}"
       "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
       "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
       "{% endif %}{% if message['role'] == 'user' %}"
       "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
       "{{ message['content'] + eos_token + ' ' }}{% else %}"
       "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
       "{% endfor %}"},
      // mistralai/Mistral-7B-Instruct-v0.1 (later revision)
      {"mistral",
       "{%- if messages[0]['role'] == 'system' %}\n    "
       "{%- set system_message = messages[0]['content'] %}\n    "
       "{%- set loop_messages = messages[1:] %}\n{%- else %}\n    "
       "{%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n"
       "{%- for message in loop_messages %}\n    "
       "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        "
       "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    "
       "{%- endif %}\n    {%- if message['role'] == 'user' %}\n        "
       "{%- if loop.first and system_message is defined %}\n            "
       "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        "
       "{%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        "
       "{%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        "
       "{{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n        "
       "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n    "
       "{%- endif %}\n{%- endfor %}\n"},
      // Qwen/Qwen2-7B-Instruct
      {"qwen2",
       "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
       "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
       "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
       "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"},
      // chatml (generic)
      {"chatml",
       "{% for message in messages %}"
       "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
       "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"},
      // TinyLlama/TinyLlama-1.1B-Chat-v1.0
      {"zephyr",
       "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
       "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
       "{% elif message['role'] == 'system' %}\n"
       "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
       "{% elif message['role'] == 'assistant' %}\n"
       "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
       "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
       "{% endfor %}"},
  };
  return k;
}
// clang-format on

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// The built-in a template probably resembles, for the refusal message.
std::string family_hint(const std::string& s) {
  if (contains(s, "<|start_header_id|>")) return "llama3";
  if (contains(s, "<|im_start|>")) return contains(s, "You are a helpful assistant") ? "qwen2" : "chatml";
  if (contains(s, "<<SYS>>")) return "llama2";
  if (contains(s, "[INST]")) return "mistral";
  if (contains(s, "<|assistant|>")) return "zephyr";
  if (contains(s, "### Instruction")) return "alpaca";
  return "";
}

}  // namespace

ChatTemplate ChatTemplate::from_jinja(const std::string& source, const std::string& origin) {
  // Files written by hand or by other tools sometimes gain surrounding whitespace; the
  // templates' own leading and trailing characters are never whitespace that renders.
  const std::string s = python_strip(source);
  for (const auto& [name, text] : known_templates())
    if (s == python_strip(text)) return builtin(name);
  std::string known;
  for (const auto& n : builtin_names()) known += (known.empty() ? "" : ", ") + n;
  const std::string hint = family_hint(s);
  throw UserError(detail::concat(
      origin, ": its chat_template is not one qtune knows (qtune renders built-in templates and "
      "recognises a model's template by its exact text); set data.template (qtune-generate: "
      "--template) to the built-in with this model's layout",
      hint.empty() ? "" : ", probably " + hint, " (one of: ", known, ")"));
}

// ---------------------------------------------------------------------------------------------
// Token ids

namespace {

// Whether encode() puts a space in front of text (sentencepiece's and llama2.c's dummy prefix).
bool adds_dummy_prefix(const Tokenizer& tok) {
  const std::vector<int> ids = tok.encode("a", false, false);
  if (ids.empty()) return false;
  const std::string first = tok.decode_token(tok.eos_id(), ids[0]);
  return !first.empty() && first[0] == ' ';
}

}  // namespace

std::vector<int> ChatTemplate::stop_ids(const Tokenizer& tok) const {
  std::vector<int> ids = {tok.eos_id()};
  const char* end_of_turn = family_ == Family::kLlama3 ? "<|eot_id|>"
                            : family_ == Family::kChatml || family_ == Family::kQwen2
                                ? "<|im_end|>"
                                : nullptr;
  if (end_of_turn != nullptr) {
    const int id = tok.token_to_id(end_of_turn);
    if (id >= 0 && id != ids[0]) ids.push_back(id);
  }
  return ids;
}

ChatTokens ChatTemplate::encode(const Conversation& c, bool add_generation_prompt,
                                const Tokenizer& tok) const {
  std::vector<ChatPiece> pieces = render(c, add_generation_prompt);
  // Control tokens the tokenizer lacks are text; they then join the text around them.
  std::vector<int> special_ids(pieces.size(), -1);
  for (size_t i = 0; i < pieces.size(); ++i)
    if (pieces[i].kind == Kind::kSpecial) {
      // One token where the tokenizer has it (tokenizer.json added tokens, tiktoken specials).
      special_ids[i] = tok.token_to_id(pieces[i].text);
      if (special_ids[i] < 0) pieces[i].kind = Kind::kText;
    }
  const bool dummy = adds_dummy_prefix(tok);
  ChatTokens out;
  auto push = [&](int id, bool a) {
    out.ids.push_back(id);
    out.assistant.push_back(a ? 1 : 0);
  };
  bool after_text = false;  // the previous piece written was text
  for (size_t i = 0; i < pieces.size();) {
    const ChatPiece& piece = pieces[i];
    if (piece.kind == Kind::kText) {
      // A run ends after an end-of-turn marker written as text, so EOS can follow it.
      std::string run;
      size_t j = i;
      bool end_of_turn = false;
      while (!end_of_turn && j < pieces.size() && pieces[j].kind == Kind::kText &&
             pieces[j].assistant == piece.assistant) {
        run += pieces[j].text;
        end_of_turn = pieces[j++].end_of_turn;
      }
      if (after_text && dummy && !run.empty() && run[0] == ' ') run.erase(0, 1);
      for (int id : tok.encode(run, false, false)) push(id, piece.assistant);
      if (end_of_turn) push(tok.eos_id(), true);
      after_text = !end_of_turn;
      i = j;
      continue;
    }
    if (piece.kind == Kind::kBos) push(tok.bos_id(), piece.assistant);
    if (piece.kind == Kind::kEos) push(tok.eos_id(), piece.assistant);
    if (piece.kind == Kind::kSpecial) {
      push(special_ids[i], piece.assistant);
      if (piece.end_of_turn && special_ids[i] != tok.eos_id()) push(tok.eos_id(), true);
    }
    after_text = false;
    ++i;
  }
  return out;
}

}  // namespace qtune
