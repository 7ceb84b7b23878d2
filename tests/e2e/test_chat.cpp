// Chat fine-tuning end to end on the shared stories260K model: configs/chat_llama2.yaml on a
// multi-turn messages file built here from ../shared/data (Alpaca sample + self-instruct seed
// tasks) lowers the held-out loss on the assistant's tokens and its adapter answers through
// qtune-generate --chat; every chat, overlong and packing key goes through trainer once; bad
// chat data ends in one clear line naming the file and line.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "qtune/files.h"
#include "test_util.h"

using nlohmann::json;
using qtune::test::bin_path;
using qtune::test::data_path;

namespace {

// Alpaca records as one exchange each (a system message on every third), then the self-instruct
// seed tasks two by two as two-exchange conversations: a small multi-turn messages data set.
std::string write_messages_file(const std::string& dir) {
  std::vector<json> out;
  const json alpaca = qtune::read_json_file(data_path("alpaca_sample102.json"));
  for (size_t i = 0; i < alpaca.size(); ++i) {
    const auto& r = alpaca[i];
    const std::string input = r.value("input", "");
    json msgs = json::array();
    if (i % 3 == 0) msgs.push_back({{"role", "system"}, {"content", "You are a helpful assistant."}});
    msgs.push_back({{"role", "user"},
                    {"content", r["instruction"].get<std::string>() + (input.empty() ? "" : "\n\n" + input)}});
    msgs.push_back({{"role", "assistant"}, {"content", r["output"]}});
    out.push_back({{"messages", msgs}});
  }
  std::ifstream seeds(data_path("self_instruct_seed_tasks.jsonl"));
  json pending = json::array();
  for (std::string line; std::getline(seeds, line);) {
    const json t = json::parse(line);
    const auto& inst = t["instances"][0];
    const std::string input = inst.value("input", "");
    pending.push_back({{"role", "user"},
                       {"content", t["instruction"].get<std::string>() + (input.empty() ? "" : "\n\n" + input)}});
    pending.push_back({{"role", "assistant"}, {"content", inst["output"]}});
    if (pending.size() == 4) {
      out.push_back({{"messages", pending}});
      pending = json::array();
    }
  }
  const std::string path = dir + "/chat_messages.jsonl";
  std::ofstream f(path);
  for (const auto& r : out) f << r.dump() << "\n";
  return path;
}

std::vector<std::string> chat_run(const std::string& data, const std::string& out) {
  return {bin_path("trainer"),
          "--config", qtune::test::source_dir() + "/configs/chat_llama2.yaml",
          "--model", data_path("stories260K.bin"),
          "--tokenizer", data_path("tok512.bin"),
          "--data", data,
          "--max_steps", "60", "--eval_every", "30", "--threads", "1",
          "--output_dir", out,
          "data.seq_len=256", "eval.max_batches=8"};
}

}  // namespace

TEST(Chat, RecipeLowersHeldOutAssistantLossAndTheAdapterAnswers) {
  const auto dir = qtune::test::temp_dir("chat");
  const std::string data = write_messages_file(dir);
  const std::string out = dir + "/run";
  auto r = qtune::test::run_program(chat_run(data, out));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // The log names the detected format and the template.
  EXPECT_NE(r.output.find("data.format auto: " + data + " is messages data"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("(messages, template llama2)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("packed examples of 256 tokens"), std::string::npos) << r.output;
  const json s = qtune::read_json_file(out + "/summary.json");
  EXPECT_LT(s["final_val_loss"].get<double>(), s["first_val_loss"].get<double>() - 0.3) << s.dump(2);

  // The adapter answers in the chat format it was trained on (the run's data.template).
  auto g = qtune::test::run_program({bin_path("qtune-generate"), "--chat", "--adapter",
                                     out + "/adapter", "--tokenizer", data_path("tok512.bin"),
                                     "--prompt", "Name three colors.", "--max_new_tokens", "200",
                                     "--threads", "1"});
  ASSERT_EQ(g.exit_code, 0) << g.output;
  EXPECT_NE(g.output.find("chat template llama2"), std::string::npos) << g.output;
  // A 260K-parameter model after a short run does not reliably end its turn; either way the
  // summary says which stop it reached.
  EXPECT_TRUE(g.output.find("answer ended at its end of turn") != std::string::npos ||
              g.output.find("answer cut at --max_new_tokens") != std::string::npos)
      << g.output;
  // The answer itself comes before the summary line and is not empty.
  const std::string answer = g.output.substr(0, g.output.find("qtune-generate:"));
  EXPECT_NE(answer.find_first_not_of(" \n"), std::string::npos) << g.output;
}

TEST(Chat, EveryChatKeyGoesThroughTrainer) {
  // ShareGPT records with their own key and role names, rendered in the ChatML template, the
  // prompt in the loss, overlong records dropped, packed, under full fine-tuning with activation
  // checkpointing; then qlora on the same packed data.
  const auto dir = qtune::test::temp_dir("chat_keys");
  std::string records;
  for (int i = 0; i < 40; ++i) {
    json conv = json::array();
    conv.push_back({{"speaker", "narrator"}, {"text", "Tell short stories."}});
    conv.push_back({{"speaker", "kid"}, {"text", "Story " + std::to_string(i) + "?"}});
    conv.push_back({{"speaker", "teller"}, {"text", "Once upon a time there was a cat number " +
                                                       std::to_string(i) + "."}});
    if (i % 10 == 0) conv.push_back({{"speaker", "teller"}, {"text", std::string(600, 'z')}});
    records += json{{"dialog", conv}}.dump() + "\n";
  }
  const std::string data = dir + "/share.jsonl";
  std::ofstream(data) << records;
  for (const std::string train_type : {"full", "qlora"}) {
    const std::string out = dir + "/" + train_type;
    auto r = qtune::test::run_program(
        {bin_path("trainer"), "--config", qtune::test::source_dir() + "/configs/default.yaml",
         "--model", data_path("stories260K.bin"), "--tokenizer", data_path("tok512.bin"),
         "--data", data, "--train_type", train_type, "--max_steps", "4", "--batch_size", "2",
         "--seq_len", "128", "--eval_every", "2", "--threads", "1", "--output_dir", out,
         "data.format=sharegpt", "data.template=chatml", "data.messages_field=dialog",
         "data.role_field=speaker", "data.content_field=text", "data.role_system=[narrator]",
         "data.role_user=[kid]", "data.role_assistant=[teller]", "data.train_on_prompt=true",
         "data.overlong=drop", "data.pack=true", "data.val_fraction=0.25",
         "train.activation_checkpointing=true", "eval.max_batches=2"});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("(sharegpt, template chatml)"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("longer than data.seq_len + 1 = 129 tokens"), std::string::npos)
        << r.output;
    EXPECT_NE(r.output.find("(data.overlong: drop)"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("packed examples of 128 tokens"), std::string::npos) << r.output;
    const json s = qtune::read_json_file(out + "/summary.json");
    EXPECT_EQ(s["steps"], 4);
    EXPECT_TRUE(std::isfinite(s["final_val_loss"].get<double>())) << s.dump(2);
  }
}

TEST(Chat, MalformedChatDataIsOneClearLine) {
  const auto dir = qtune::test::temp_dir("chat_bad");
  const std::string data = dir + "/bad.jsonl";
  std::ofstream(data) << R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})"
                      << "\n"
                      << R"({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]})"
                      << "\n"
                      << R"({"messages": [{"role": "user"}]})" << "\n";
  auto r = qtune::test::run_program({bin_path("trainer"), "--model", data_path("stories260K.bin"),
                                     "--tokenizer", data_path("tok512.bin"), "--data", data,
                                     "data.template=llama2", "--threads", "1",
                                     "--output_dir", dir + "/run"});
  EXPECT_EQ(r.exit_code, 2) << r.output;
  // Both records are logged; the last line is the one error line with the first and the count.
  std::string out = r.output;
  while (!out.empty() && out.back() == '\n') out.pop_back();
  const std::string last = out.substr(out.rfind('\n') + 1);
  EXPECT_NE(last.find("trainer: error: " + data + " line 2: messages[1]: unknown role \"robot\""),
            std::string::npos)
      << r.output;
  EXPECT_NE(last.find("and 1 more malformed record in " + data), std::string::npos) << r.output;
  EXPECT_NE(out.find(data + " line 3: messages[0]: key \"content\" is missing"), std::string::npos)
      << r.output;
  // An unknown template name is refused before anything is loaded.
  r = qtune::test::run_program({bin_path("trainer"), "data.template=vicuna"});
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("data.template: unknown chat template 'vicuna'"), std::string::npos)
      << r.output;
}

// data.template auto (and qtune-generate --chat without --template or a trained recipe) takes
// the chat_template of the tokenizer_config.json beside the tokenizer.
TEST(Chat, AutoTemplateIsTheTokenizersOwn) {
  const auto dir = qtune::test::temp_dir("chat_own");
  std::filesystem::copy_file(data_path("tok512.bin"), dir + "/tok512.bin");
  const json templates = qtune::read_json_file(data_path("chat_templates.json"));
  std::ofstream(dir + "/tokenizer_config.json")
      << json{{"chat_template", templates["templates"]["chatml (generic)"]["chat_template"]}}.dump();
  const std::string data = write_messages_file(dir);
  auto r = qtune::test::run_program(
      {bin_path("trainer"), "--model", data_path("stories260K.bin"), "--tokenizer",
       dir + "/tok512.bin", "--data", data, "data.template=auto", "--max_steps", "1",
       "--eval_every", "0", "--threads", "1", "--output_dir", dir + "/run", "eval.max_batches=1"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("(messages, template chatml)"), std::string::npos) << r.output;

  auto g = qtune::test::run_program({bin_path("qtune-generate"), "--chat", "--model",
                                     data_path("stories260K.bin"), "--tokenizer",
                                     dir + "/tok512.bin", "--prompt", "Hi", "--max_new_tokens",
                                     "4", "--threads", "1"});
  ASSERT_EQ(g.exit_code, 0) << g.output;
  EXPECT_NE(g.output.find("chat template chatml"), std::string::npos) << g.output;

  // A template qtune does not know is refused naming the file.
  std::ofstream(dir + "/tokenizer_config.json") << json{{"chat_template", "{{ 'mine' }}"}}.dump();
  r = qtune::test::run_program({bin_path("trainer"), "--model", data_path("stories260K.bin"),
                                "--tokenizer", dir + "/tok512.bin", "--data", data,
                                "data.template=auto", "--max_steps", "1", "--output_dir",
                                dir + "/run2"});
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find(dir + "/tokenizer_config.json: its chat_template is not one qtune knows"),
            std::string::npos)
      << r.output;
}
