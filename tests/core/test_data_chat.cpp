// Chat data and packing: messages / sharegpt records (JSON array and JSONL, configurable keys and
// role names, format detection), every malformed record reported, the overlong policy, loss on
// the assistant's tokens only, and packed examples whose segments never predict across a
// boundary. A character tokenizer makes the expectations exact; the shared Alpaca sample and
// tok512.bin check that a one-exchange conversation in the alpaca template is the alpaca format.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "char_tokenizer.h"
#include "qtune/chat_template.h"
#include "qtune/data.h"
#include "qtune/error.h"
#include "qtune/files.h"
#include "qtune/tokenizer.h"
#include "test_util.h"

using nlohmann::json;
using qtune::DataConfig;
using qtune::kIgnoreIndex;
using qtune::test::chars;
using qtune::test::CharTokenizer;
using qtune::test::load_data_error;
using qtune::test::write_temp_file;

namespace {

#define EXPECT_HAS(msg, part) EXPECT_NE((msg).find(part), std::string::npos) << (msg)

DataConfig chat_config(const std::string& path, int64_t seq_len, const std::string& tmpl = "llama2") {
  DataConfig c;
  c.path = path;
  c.seq_len = seq_len;
  c.chat_template = tmpl;
  return c;
}

// The counted targets of example i, as text.
std::string target_text(const qtune::TokenDataset& ds, int64_t i) {
  std::vector<int64_t> t;
  for (int64_t id : ds.get(i).targets)
    if (id != kIgnoreIndex) t.push_back(id);
  return chars(t);
}

std::string jsonl(const std::vector<json>& records) {
  std::string s;
  for (const auto& r : records) s += r.dump() + "\n";
  return s;
}

const json kTwoTurns = {{"messages",
                         {{{"role", "system"}, {"content", "Be brief."}},
                          {{"role", "user"}, {"content", "Hi"}},
                          {{"role", "assistant"}, {"content", "Hello"}},
                          {{"role", "user"}, {"content", "Bye"}},
                          {{"role", "assistant"}, {"content", "Ciao"}}}}};
const json kOneTurn = {{"messages",
                        {{{"role", "user"}, {"content", "2+2?"}},
                         {{"role", "assistant"}, {"content", "4"}}}}};

}  // namespace

TEST(DataChat, MessagesLossIsOnTheAssistantTokensOnly) {
  const std::string path = write_temp_file("data_chat", "chat.jsonl", jsonl({kTwoTurns, kOneTurn}));
  auto s = qtune::load_data(chat_config(path, 128), CharTokenizer());
  const auto& ds = *s.train;
  ASSERT_EQ(ds.size(), 2);
  EXPECT_EQ(ds.stats().format, "messages");
  EXPECT_EQ(ds.stats().chat_template, "llama2");
  EXPECT_FALSE(ds.packed());
  // Inputs are the rendered conversation; targets the answers and their EOS (which the model
  // learns to emit: padding is never taken for an EOS).
  const auto e = ds.get(0);
  const std::string rendered =
      "^[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello $^[INST] Bye [/INST] Ciao $";
  EXPECT_EQ(chars(e.tokens).substr(0, rendered.size()), rendered);
  EXPECT_EQ(target_text(ds, 0), " Hello $ Ciao $");
  EXPECT_EQ(target_text(ds, 1), " 4 $");
  EXPECT_EQ(ds.stats().target_tokens, 15 + 4);
  // Every counted target is the next input.
  for (int64_t j = 0; j + 1 < ds.seq_len(); ++j)
    if (e.targets[j] != kIgnoreIndex) {
      EXPECT_EQ(e.targets[j], e.tokens[j + 1]);
    }

  // The same records as a JSON array give the same examples, named by index instead of line.
  const std::string array = write_temp_file("data_chat", "chat.json", json::array({kTwoTurns, kOneTurn}).dump(1));
  auto a = qtune::load_data(chat_config(array, 128), CharTokenizer());
  for (int64_t i = 0; i < 2; ++i) {
    EXPECT_EQ(a.train->get(i).tokens, ds.get(i).tokens);
    EXPECT_EQ(a.train->get(i).targets, ds.get(i).targets);
  }

  // data.train_on_prompt: every token but the first is a target.
  DataConfig all = chat_config(path, 128);
  all.train_on_prompt = true;
  auto t = qtune::load_data(all, CharTokenizer());
  EXPECT_EQ(target_text(*t.train, 0), rendered.substr(1));
}

TEST(DataChat, ShareGptAndRenamedFieldsGiveTheSameExamples) {
  const std::string messages = write_temp_file("data_chat", "m.jsonl", jsonl({kTwoTurns}));
  const json share = {{"conversations",
                       {{{"from", "system"}, {"value", "Be brief."}},
                        {{"from", "human"}, {"value", "Hi"}},
                        {{"from", "gpt"}, {"value", "Hello"}},
                        {{"from", "human"}, {"value", "Bye"}},
                        {{"from", "gpt"}, {"value", "Ciao"}}}}};
  const json renamed = {{"dialog",
                         {{{"speaker", "instructions"}, {"text", "Be brief."}},
                          {{"speaker", "customer"}, {"text", "Hi"}},
                          {{"speaker", "agent"}, {"text", "Hello"}},
                          {{"speaker", "customer"}, {"text", "Bye"}},
                          {{"speaker", "agent"}, {"text", "Ciao"}}}}};
  // OpenAI's list-of-parts content is joined.
  json parts = kTwoTurns;
  parts["messages"][2]["content"] = {{{"type", "text"}, {"text", "Hel"}},
                                     {{"type", "text"}, {"text", "lo"}}};
  const auto want = qtune::load_data(chat_config(messages, 96), CharTokenizer()).train->get(0);

  DataConfig c = chat_config(write_temp_file("data_chat", "s.json", json::array({share}).dump()), 96);
  auto s = qtune::load_data(c, CharTokenizer());
  EXPECT_EQ(s.train->stats().format, "sharegpt");  // detected
  EXPECT_EQ(s.train->get(0).tokens, want.tokens);
  EXPECT_EQ(s.train->get(0).targets, want.targets);

  c = chat_config(write_temp_file("data_chat", "r.jsonl", jsonl({renamed})), 96);
  c.format = "messages";
  c.messages_field = "dialog";
  c.role_field = "speaker";
  c.content_field = "text";
  c.role_system = {"instructions"};
  c.role_user = {"customer"};
  c.role_assistant = {"agent", "bot"};
  EXPECT_EQ(qtune::load_data(c, CharTokenizer()).train->get(0).targets, want.targets);

  c = chat_config(write_temp_file("data_chat", "p.jsonl", jsonl({parts})), 96);
  EXPECT_EQ(qtune::load_data(c, CharTokenizer()).train->get(0).targets, want.targets);
}

TEST(DataChat, FormatAutoPicksByContent) {
  const auto format_of = [](const std::string& name, const std::string& content) {
    DataConfig c = chat_config(write_temp_file("data_chat", name, content), 400);
    return qtune::load_data(c, CharTokenizer()).train->stats().format;
  };
  EXPECT_EQ(format_of("a.jsonl", jsonl({kOneTurn})), "messages");
  EXPECT_EQ(format_of("b.dat", json::array({kOneTurn}).dump()), "messages");
  EXPECT_EQ(format_of("c.json", R"([{"conversations": [{"from": "human", "value": "a"},
                                                       {"from": "gpt", "value": "b"}]}])"),
            "sharegpt");
  // ShareGPT messages under "messages" are read as ShareGPT.
  EXPECT_EQ(format_of("d.json", R"([{"messages": [{"from": "human", "value": "a"},
                                                  {"from": "gpt", "value": "b"}]}])"),
            "sharegpt");
  EXPECT_EQ(format_of("e.json", R"([{"instruction": "a", "output": "b"}])"), "alpaca");
  const std::string msg = load_data_error(chat_config(write_temp_file("data_chat", "f.json", R"([{"prompt": "a"}])"), 64));
  EXPECT_HAS(msg, "f.json record [0]");
  EXPECT_HAS(msg, "cannot tell the format from the keys (prompt)");
}

TEST(DataChat, EveryMalformedRecordIsReported) {
  const std::string path = write_temp_file("data_chat",
      "bad.jsonl",
      jsonl({kOneTurn,
             {{"messages", {{{"role", "user"}, {"content", "a"}}, {{"role", "bot"}, {"content", "b"}}}}},
             {{"messages", {{{"role", "user"}}}}},
             {{"dialog", json::array()}},
             {{"messages", {{{"role", "user"}, {"content", "only a question"}}}}},
             {{"messages", {{{"role", "user"}, {"content", "a"}}, {{"role", "user"}, {"content", "b"}}}}},
             {{"messages", {{{"role", "user"}, {"content", 5}}}}}}) +
          "{\"messages\": [\n");
  const std::string msg = load_data_error(chat_config(path, 64));
  // The line is the first malformed record; the count covers all seven.
  EXPECT_HAS(msg, path + " line 2: messages[1]: unknown role \"bot\"");
  EXPECT_HAS(msg, "data.role_assistant");
  EXPECT_HAS(msg, "and 6 more malformed records in " + path);
  // Each kind on its own names the record and what was expected.
  const auto only = [&](const json& record) {
    return load_data_error(chat_config(write_temp_file("data_chat", "one.jsonl", jsonl({kOneTurn, record})), 64));
  };
  EXPECT_HAS(only({{"messages", {{{"role", "user"}}}}}),
             "line 2: messages[0]: key \"content\" is missing");
  EXPECT_HAS(only({{"dialog", json::array()}}),
             "line 2: key \"messages\" is missing (keys: dialog; data.messages_field");
  EXPECT_HAS(only({{"messages", {{{"role", "user"}, {"content", "q"}}}}}),
             "line 2: no assistant message");
  EXPECT_HAS(only({{"messages", {{{"role", "user"}, {"content", "a"}}, {{"role", "user"}, {"content", "b"}},
                                 {{"role", "assistant"}, {"content", "c"}}}}}),
             "line 2: llama2 template: Conversation roles must alternate");
  EXPECT_HAS(only({{"messages", {{{"role", "user"}, {"content", 5}}}}}),
             "line 2: messages[0]: key \"content\" must be a string");
  EXPECT_HAS(only(json::array({1})), "line 2: expected an object with \"messages\"");
  EXPECT_HAS(load_data_error(chat_config(write_temp_file("data_chat", "trunc.jsonl", jsonl({kOneTurn}) + "{\"messages\"\n"), 64)),
             "line 2: invalid JSON");
}

TEST(DataChat, TemplateChoiceAndTheModelsOwn) {
  const std::string path = write_temp_file("data_chat", "t.jsonl", jsonl({kOneTurn}));
  // 256: with one id per byte, llama3's header tokens alone are ~100 ids.
  DataConfig c = chat_config(path, 256, "auto");
  EXPECT_HAS(load_data_error(c), "data.template: auto takes the model's chat template, but the model has none");
  // The model's own (known) template is used under auto.
  const auto file = qtune::read_json_file(qtune::test::data_path("chat_templates.json"));
  c.model_chat_template = file["templates"]["chatml (generic)"]["chat_template"];
  c.model_chat_template_origin = "m/tokenizer_config.json";
  auto s = qtune::load_data(c, CharTokenizer());
  EXPECT_EQ(s.train->stats().chat_template, "chatml");
  EXPECT_EQ(target_text(*s.train, 0), "4<|im_end|>$");
  c.model_chat_template = "{{ 'my own' }}";
  EXPECT_HAS(load_data_error(c), "m/tokenizer_config.json: its chat_template is not one qtune knows");
  // An explicit choice wins over the model's.
  c.chat_template = "llama3";
  EXPECT_EQ(qtune::load_data(c, CharTokenizer()).train->stats().chat_template, "llama3");
  c.chat_template = "vicuna";
  EXPECT_HAS(load_data_error(c), "data.template: unknown chat template 'vicuna'");
}

TEST(DataChat, OverlongRecordsAreTruncatedOrDroppedAndCounted) {
  json long_answer = kOneTurn;
  long_answer["messages"][1]["content"] = std::string(100, 'y');
  json long_question = kOneTurn;
  long_question["messages"][0]["content"] = std::string(100, 'x');
  const std::string path = write_temp_file("data_chat", "long.jsonl", jsonl({kOneTurn, long_answer, long_question}));
  // "^[INST] 2+2? [/INST] 4 $" is 24 ids; T = 40 keeps 41.
  DataConfig c = chat_config(path, 40);
  auto s = qtune::load_data(c, CharTokenizer());
  EXPECT_EQ(s.train->size(), 2);
  EXPECT_EQ(s.train->stats().truncated_records, 2);
  EXPECT_EQ(s.train->stats().dropped_records, 1);  // the long question leaves no answer
  const std::string cut = target_text(*s.train, 1);
  EXPECT_EQ(cut, " " + std::string(cut.size() - 1, 'y'));
  c.overlong = "drop";
  s = qtune::load_data(c, CharTokenizer());
  EXPECT_EQ(s.train->size(), 1);
  EXPECT_EQ(s.train->stats().truncated_records, 0);
  EXPECT_EQ(s.train->stats().dropped_records, 2);
  c.overlong = "cut";
  EXPECT_HAS(load_data_error(c), "data.overlong must be truncate or drop, got 'cut'");
}

TEST(DataChat, PackingKeepsEveryRecordInItsOwnSegment) {
  std::vector<json> records;
  for (int i = 0; i < 9; ++i) {
    json r = kOneTurn;
    r["messages"][0]["content"] = "q" + std::string(i, 'q');
    r["messages"][1]["content"] = "a" + std::to_string(i);
    records.push_back(r);
  }
  const std::string path = write_temp_file("data_chat", "pack.jsonl", jsonl(records));
  DataConfig c = chat_config(path, 64);
  const auto plain = qtune::load_data(c, CharTokenizer()).train;
  c.pack = true;
  const auto packed = qtune::load_data(c, CharTokenizer()).train;
  ASSERT_TRUE(packed->packed());
  EXPECT_LT(packed->size(), plain->size());
  EXPECT_EQ(packed->stats().packed_records, 9);
  EXPECT_EQ(packed->stats().target_tokens, plain->stats().target_tokens);
  EXPECT_LT(packed->stats().padding_tokens, plain->stats().padding_tokens);
  EXPECT_EQ(packed->stats().padding_tokens + plain->size() * 64 - plain->stats().padding_tokens,
            packed->size() * 64);

  // Walking the segments in order gives back every record's inputs and targets, each segment
  // starting at position 0 with its BOS and ending with a target that is its own EOS.
  const int64_t T = packed->seq_len();
  int64_t record = 0;
  std::vector<int64_t> pos(T), seg(T);
  for (int64_t i = 0; i < packed->size(); ++i) {
    const auto e = packed->get(i);
    packed->fill_segments(i, pos.data(), seg.data());
    for (int64_t j = 0; j < T;) {
      if (seg[j] == 0) {  // padding runs to the end of the row
        for (int64_t k = j; k < T; ++k) {
          EXPECT_EQ(seg[k], 0);
          EXPECT_EQ(e.targets[k], kIgnoreIndex);
        }
        break;
      }
      int64_t end = j;
      while (end < T && seg[end] == seg[j]) ++end;
      const auto want = plain->get(record++);
      for (int64_t k = j; k < end; ++k) {
        EXPECT_EQ(pos[k], k - j);
        EXPECT_EQ(e.tokens[k], want.tokens[k - j]);
        EXPECT_EQ(e.targets[k], want.targets[k - j]);
      }
      EXPECT_EQ(e.tokens[j], 1);            // BOS
      EXPECT_EQ(e.targets[end - 1], 2);     // EOS, never the next record's BOS
      j = end;
    }
  }
  EXPECT_EQ(record, 9);

  // A batch carries positions and segment ids; an unpacked one does not.
  qtune::DataLoader loader(packed, 2, 0, /*shuffle=*/false);
  const auto b = loader.next();
  ASSERT_TRUE(b.positions.defined() && b.segments.defined());
  EXPECT_EQ(b.positions.sizes(), b.tokens.sizes());
  packed->fill_segments(1, pos.data(), seg.data());
  EXPECT_EQ(b.segments[1][0].item<int64_t>(), seg[0]);
  EXPECT_FALSE(qtune::DataLoader(plain, 2, 0).next().positions.defined());
}

TEST(DataChat, PackedTextKeepsDocumentsApart) {
  // Three documents; the 20-byte one is cut into pieces of at most T + 1 ids sharing one id.
  const std::string path = write_temp_file("data_chat", "docs.txt", "ab\n\n" + std::string(20, 'c') + "\n\nd e\n");
  DataConfig c;
  c.path = path;
  c.seq_len = 8;
  c.pack = true;
  auto s = qtune::load_data(c, CharTokenizer());
  const auto& ds = *s.train;
  ASSERT_TRUE(ds.packed());
  std::string targets;
  std::vector<int64_t> pos(8), seg(8);
  for (int64_t i = 0; i < ds.size(); ++i) {
    targets += target_text(ds, i);
    ds.fill_segments(i, pos.data(), seg.data());
  }
  // Every token but each document's BOS is a target exactly once.
  EXPECT_EQ(targets, "ab$" + std::string(20, 'c') + "$d e$");
  EXPECT_EQ(ds.stats().target_tokens, 3 + 21 + 4);
}

TEST(DataChat, AlpacaTemplateOnAConversationIsTheAlpacaFormat) {
  // alpaca_sample102.json read as Alpaca, and the same records as one-exchange conversations in
  // the alpaca template, give identical examples under the real llama2.c tokenizer.
  auto tok = qtune::load_tokenizer(qtune::test::data_path("tok512.bin"));
  const auto records = qtune::read_json_file(qtune::test::data_path("alpaca_sample102.json"));
  std::vector<json> chats;
  for (const auto& r : records) {
    if (!r.value("input", "").empty()) continue;  // the input variant has another preamble
    chats.push_back({{"messages",
                      {{{"role", "user"}, {"content", r["instruction"]}},
                       {{"role", "assistant"}, {"content", r["output"]}}}}});
  }
  ASSERT_GT(chats.size(), 40u);
  std::vector<json> plain;
  for (const auto& r : records)
    if (r.value("input", "").empty()) plain.push_back(r);
  DataConfig a;
  a.path = write_temp_file("data_chat", "alpaca_no_input.json", json(plain).dump());
  a.seq_len = 256;
  DataConfig m = chat_config(write_temp_file("data_chat", "alpaca_chat.jsonl", jsonl(chats)), 256, "alpaca");
  const auto da = qtune::load_data(a, *tok).train;
  const auto dm = qtune::load_data(m, *tok).train;
  ASSERT_EQ(da->size(), dm->size());
  EXPECT_EQ(da->stats().target_tokens, dm->stats().target_tokens);
  for (int64_t i = 0; i < da->size(); ++i) {
    ASSERT_EQ(da->get(i).tokens, dm->get(i).tokens) << i;
    ASSERT_EQ(da->get(i).targets, dm->get(i).targets) << i;
  }
}
