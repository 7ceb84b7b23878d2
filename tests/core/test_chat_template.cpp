// Chat templates: every rendered example of ../shared/data/chat_templates.json (the real template
// strings, rendered by jinja2 the way transformers does) reproduced by the built-in its string
// maps to; hand-checked system / no-system / multi-turn layouts; the refusals; and the token
// layout the loss relies on (assistant ids, end of turn, BOS placement, the dummy prefix).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "char_tokenizer.h"
#include "qtune/chat_template.h"
#include "qtune/error.h"
#include "qtune/files.h"
#include "test_util.h"

using qtune::ChatTemplate;
using qtune::Conversation;
using qtune::test::chars;
using qtune::test::CharTokenizer;

namespace {

#define EXPECT_HAS(msg, part) EXPECT_NE((msg).find(part), std::string::npos) << (msg)

Conversation from_json(const nlohmann::json& messages) {
  Conversation c;
  for (const auto& m : messages) c.push_back({m["role"], m["content"]});
  return c;
}

std::string token_or_empty(const nlohmann::json& v) {
  return v.is_string() ? v.get<std::string>() : std::string();
}

using qtune::test::error_of;

// The ids of `t` whose assistant flag is set, as text.
std::string assistant_text(const qtune::ChatTokens& t) {
  std::vector<int> a;
  for (size_t i = 0; i < t.ids.size(); ++i)
    if (t.assistant[i]) a.push_back(t.ids[i]);
  return chars(a);
}

const Conversation kMultiTurn = {{"system", "Be brief."},
                                 {"user", "Hi"},
                                 {"assistant", "Hello"},
                                 {"user", "Bye"},
                                 {"assistant", "Ciao"}};

}  // namespace

TEST(ChatTemplate, RealTemplateStringsRenderTheirExamples) {
  const auto file = qtune::read_json_file(qtune::test::data_path("chat_templates.json"));
  const std::map<std::string, std::string> expected_builtin = {
      {"meta-llama/Llama-2-7b-chat-hf", "llama2"},
      {"meta-llama/Meta-Llama-3-8B-Instruct", "llama3"},
      {"mistralai/Mistral-7B-Instruct-v0.1", "mistral_v1"},
      {"mistralai/Mistral-7B-Instruct-v0.1 (later revision)", "mistral"},
      {"Qwen/Qwen2-7B-Instruct", "qwen2"},
      {"chatml (generic)", "chatml"},
      {"TinyLlama/TinyLlama-1.1B-Chat-v1.0", "zephyr"}};
  ASSERT_EQ(file["templates"].size(), expected_builtin.size());
  for (const auto& [model, entry] : file["templates"].items()) {
    SCOPED_TRACE(model);
    ASSERT_TRUE(expected_builtin.count(model)) << "new entry: map it to a built-in";
    const ChatTemplate t = ChatTemplate::from_jinja(entry["chat_template"], model);
    EXPECT_EQ(t.name(), expected_builtin.at(model));
    const auto& ex = entry["example"];
    EXPECT_EQ(t.render_text(from_json(ex["messages"]), ex["add_generation_prompt"].get<bool>(),
                            token_or_empty(entry["bos_token"]), token_or_empty(entry["eos_token"])),
              ex["rendered"].get<std::string>());
  }
}

TEST(ChatTemplate, SystemAndNoSystemLayouts) {
  // Read off the real templates (and checked against jinja2 by tests/oracle).
  const Conversation no_system(kMultiTurn.begin() + 1, kMultiTurn.end());
  EXPECT_EQ(ChatTemplate::builtin("llama2").render_text(no_system, true),
            "<s>[INST] Hi [/INST] Hello </s><s>[INST] Bye [/INST] Ciao </s>");
  EXPECT_EQ(ChatTemplate::builtin("llama2").render_text(kMultiTurn, false),
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST] "
            "Ciao </s>");
  EXPECT_EQ(ChatTemplate::builtin("llama3").render_text({{"user", " Hi \n"}}, true),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(ChatTemplate::builtin("chatml").render_text({{"system", "S"}, {"user", "U"}}, true),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(ChatTemplate::builtin("qwen2").render_text({{"system", "S"}, {"user", "U"}}, false),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
  EXPECT_EQ(ChatTemplate::builtin("mistral").render_text(no_system, false),
            "<s> [INST] Hi [/INST] Hello</s> [INST] Bye [/INST] Ciao</s>");
  EXPECT_EQ(ChatTemplate::builtin("mistral_v1").render_text(no_system, false),
            "<s>[INST] Hi [/INST]Hello</s> [INST] Bye [/INST]Ciao</s> ");
  EXPECT_EQ(ChatTemplate::builtin("zephyr").render_text({{"user", "U"}}, true),
            "<|user|>\nU</s>\n<|assistant|>\n");
  // Alpaca: one exchange is exactly the Stanford prompt; a system message replaces the preamble.
  EXPECT_EQ(ChatTemplate::builtin("alpaca").render_text({{"user", "Add."}, {"assistant", "3"}}, false),
            "<s>Below is an instruction that describes a task. Write a response that "
            "appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Response: 3</s>");
  EXPECT_EQ(ChatTemplate::builtin("alpaca").render_text(kMultiTurn, false),
            "<s>Be brief.\n\n### Instruction:\nHi\n\n### Response: Hello</s>\n\n### Instruction:\n"
            "Bye\n\n### Response: Ciao</s>");
}

TEST(ChatTemplate, PythonStripIsUnicodeAware) {
  EXPECT_EQ(qtune::python_strip(" \t\n x y \r\f\v"), "x y");
  EXPECT_EQ(qtune::python_strip("\xC2\xA0\xE3\x80\x80x\xE2\x80\xA8\x1F"), "x");  // NBSP, U+3000
  EXPECT_EQ(qtune::python_strip("\xE2\x80\x8Bx"), "\xE2\x80\x8Bx");  // zero-width space stays
  EXPECT_EQ(qtune::python_strip("  "), "");
  EXPECT_EQ(qtune::python_strip("\xFF "), "\xFF");  // invalid UTF-8 is kept
}

TEST(ChatTemplate, RefusesWhatTheRealTemplatesRefuse) {
  EXPECT_HAS(error_of([] {
               ChatTemplate::builtin("llama2").render({{"user", "a"}, {"user", "b"}}, false);
             }),
             "Conversation roles must alternate user/assistant/user/assistant/...");
  EXPECT_HAS(error_of([] {
               ChatTemplate::builtin("mistral_v1").render({{"system", "s"}, {"user", "u"}}, false);
             }),
             "roles must alternate");
  EXPECT_HAS(error_of([] {
               ChatTemplate::builtin("mistral").render(
                   {{"system", "s"}, {"user", "u"}, {"assistant", "a"}, {"user", "v"}, {"system", "t"}},
                   false);
             }),
             "Only user and assistant roles are supported");
  EXPECT_HAS(error_of([] { ChatTemplate::builtin("chatml").render({}, false); }), "no messages");
  EXPECT_HAS(error_of([] { ChatTemplate::builtin("chatml").render({{"tool", "x"}}, false); }),
             "role 'tool'");
  const std::string unknown = error_of([] { ChatTemplate::builtin("vicuna"); });
  EXPECT_HAS(unknown, "data.template: unknown chat template 'vicuna'");
  EXPECT_HAS(unknown, "llama2, llama3, chatml");
}

TEST(ChatTemplate, UnknownModelTemplateIsRefusedNamingTheBuiltinToChoose) {
  // The Llama 2 template as TGI writes it (`| trim` instead of .strip()): same layout, other text.
  std::string variant =
      "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
      "message['content'] | trim + ' [/INST]' }}{% endif %}{% endfor %}{{ '<<SYS>>' }}";
  const std::string msg = error_of([&] { ChatTemplate::from_jinja(variant, "m/tokenizer_config.json"); });
  EXPECT_HAS(msg, "m/tokenizer_config.json");
  EXPECT_HAS(msg, "set data.template");
  EXPECT_HAS(msg, "probably llama2");
  EXPECT_HAS(error_of([] { ChatTemplate::from_jinja("{{ '<|im_start|>' }}", "x"); }),
             "probably chatml");
  EXPECT_HAS(error_of([] { ChatTemplate::from_jinja("{{ messages }}", "x"); }),
             "(one of: llama2, llama3");
  // Surrounding whitespace does not hide a known template.
  const auto file = qtune::read_json_file(qtune::test::data_path("chat_templates.json"));
  const std::string llama3 = file["templates"]["meta-llama/Meta-Llama-3-8B-Instruct"]["chat_template"];
  EXPECT_EQ(ChatTemplate::from_jinja("\n" + llama3 + "\n", "x").name(), "llama3");
}

TEST(ChatTemplate, AssistantTokensAreTheAnswersAndTheirEnds) {
  const CharTokenizer tok;
  // Llama 2: BOS before every [INST] (the real template), EOS closes each answer; the answers and
  // their EOS are the assistant's, nothing else.
  auto t = ChatTemplate::builtin("llama2").encode(kMultiTurn, false, tok);
  ASSERT_EQ(t.ids.size(), t.assistant.size());
  EXPECT_EQ(chars(t.ids),
            "^[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello $^[INST] Bye [/INST] Ciao $");
  EXPECT_EQ(assistant_text(t), " Hello $ Ciao $");
  // Llama 3: BOS once; the end-of-turn marker is text for this tokenizer, so EOS follows it.
  t = ChatTemplate::builtin("llama3").encode(kMultiTurn, false, tok);
  EXPECT_EQ(std::count(t.ids.begin(), t.ids.end(), tok.bos_id()), 1);
  EXPECT_EQ(t.ids[0], tok.bos_id());
  EXPECT_EQ(assistant_text(t), "Hello<|eot_id|>$Ciao<|eot_id|>$");
  // ChatML has no BOS; the newline after <|im_end|> belongs to the next prompt.
  t = ChatTemplate::builtin("chatml").encode(kMultiTurn, false, tok);
  EXPECT_EQ(std::count(t.ids.begin(), t.ids.end(), tok.bos_id()), 0);
  EXPECT_EQ(assistant_text(t), "Hello<|im_end|>$Ciao<|im_end|>$");
  // A user turn's EOS (Zephyr ends every message with one) is not the assistant's.
  t = ChatTemplate::builtin("zephyr").encode(kMultiTurn, false, tok);
  EXPECT_EQ(assistant_text(t), "Hello$Ciao$");
  EXPECT_EQ(std::count(t.ids.begin(), t.ids.end(), tok.eos_id()), 5);
  // The generation prompt is never the assistant's.
  t = ChatTemplate::builtin("llama3").encode({{"user", "Hi"}}, true, tok);
  EXPECT_EQ(assistant_text(t), "");
  const std::string opening = "<|start_header_id|>assistant<|end_header_id|>\n\n";
  const std::string text = chars(t.ids);
  ASSERT_GE(text.size(), opening.size());
  EXPECT_EQ(text.substr(text.size() - opening.size()), opening);
}

TEST(ChatTemplate, DummyPrefixStandsForTheSpaceBeforeAnAnswer) {
  // With sentencepiece-style encoding, the run after a special token gets the dummy prefix as
  // Hugging Face's Llama tokenizer gives it; an answer continuing the prompt's text keeps one
  // space, not two.
  const CharTokenizer tok(/*dummy_prefix=*/true);
  const Conversation c = {{"user", "Hi"}, {"assistant", "Hello"}};
  auto t = ChatTemplate::builtin("llama2").encode(c, false, tok);
  EXPECT_EQ(chars(t.ids), "^ [INST] Hi [/INST] Hello $");
  EXPECT_EQ(assistant_text(t), " Hello $");
  t = ChatTemplate::builtin("alpaca").encode(c, false, tok);
  EXPECT_EQ(assistant_text(t), " Hello$");
  // Without the prefix the answer's own space is kept.
  t = ChatTemplate::builtin("alpaca").encode(c, false, CharTokenizer());
  EXPECT_EQ(assistant_text(t), " Hello$");
}
