// The data pipeline: text packing, Alpaca prompt masking, the document-level split, the seeded
// resumable loader and the error messages, with a character-level fake tokenizer for exact
// expectations, plus one run on the shared data with the real llama2.c tokenizer.
#include <gtest/gtest.h>

#include <fstream>
#include <set>

#include "qtune/data.h"
#include "qtune/error.h"
#include "qtune/tokenizer.h"
#include "char_tokenizer.h"
#include "test_util.h"

using qtune::DataConfig;
using qtune::DataLoader;
using qtune::kIgnoreIndex;
using qtune::test::chars;
using qtune::test::CharTokenizer;
using qtune::test::load_data_error;
using qtune::test::write_temp_file;

namespace {

DataConfig text_config(const std::string& path, int64_t seq_len) {
  DataConfig c;
  c.path = path;
  c.seq_len = seq_len;
  return c;
}

#define EXPECT_HAS(msg, part) EXPECT_NE((msg).find(part), std::string::npos) << (msg)

// The whole token stream a packed dataset covers: every block's inputs, then the last target.
std::vector<int64_t> packed_stream(const qtune::TokenDataset& ds) {
  std::vector<int64_t> s;
  for (int64_t i = 0; i < ds.size(); ++i) {
    auto e = ds.get(i);
    s.insert(s.end(), e.tokens.begin(), e.tokens.end());
    if (i + 1 == ds.size()) s.push_back(e.targets.back());
  }
  return s;
}

// 40 documents with unique markers, separated by varied blank lines.
std::string numbered_documents(int n) {
  std::string text;
  for (int d = 0; d < n; ++d) {
    text += "doc" + std::to_string(d) + " line one\nline two of " + std::to_string(d) + "\n";
    text += (d % 3 == 0) ? "\n" : (d % 3 == 1 ? "\n  \n\n" : "\r\n");
  }
  return text;
}

// Marker numbers of the documents a packed dataset with seq_len 1 holds (it drops nothing).
std::set<int> document_markers(const qtune::TokenDataset& ds) {
  const std::string s = chars(packed_stream(ds));
  std::set<int> out;
  for (size_t at = s.find("^doc"); at != std::string::npos; at = s.find("^doc", at + 1))
    out.insert(std::stoi(s.substr(at + 4)));
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Plain text

TEST(Data, TextPackingCoversEveryTokenExactlyOnce) {
  // Documents split at one or more blank lines, whitespace-only lines and CRLF included.
  const std::string path = write_temp_file("data", "docs.txt", "ab\ncd\n\n\nefg\r\n\r\n  \t\nh\n\ni j\nk");
  const std::vector<std::string> docs = {"ab\ncd", "efg", "h", "i j\nk"};
  std::vector<int64_t> stream;
  for (const auto& d : docs)
    for (int id : CharTokenizer().encode(d, true, true)) stream.push_back(id);
  ASSERT_EQ(stream.size(), 22u);

  const int64_t T = 7;  // 21 = 3 * 7: the blocks cover the stream with nothing left over
  auto splits = qtune::load_data(text_config(path, T), CharTokenizer());
  EXPECT_EQ(splits.val, nullptr);
  const auto& ds = *splits.train;
  EXPECT_EQ(ds.size(), (22 - 1) / T);
  EXPECT_EQ(ds.seq_len(), T);
  EXPECT_EQ(ds.stats().documents, 4);
  EXPECT_EQ(ds.stats().tokens, 22);
  EXPECT_EQ(ds.stats().format, "text");
  for (int64_t i = 0; i < ds.size(); ++i) {
    auto e = ds.get(i);
    for (int64_t j = 0; j < T; ++j) {
      EXPECT_EQ(e.tokens[j], stream[i * T + j]) << i << "," << j;
      EXPECT_EQ(e.targets[j], stream[i * T + j + 1]) << i << "," << j;
    }
  }
  // Inputs of consecutive blocks tile the stream and the last target closes it: nothing lost.
  EXPECT_EQ(packed_stream(ds), stream);

  // A tail shorter than a block is dropped (and counted).
  auto s5 = qtune::load_data(text_config(path, 5), CharTokenizer());
  EXPECT_EQ(s5.train->size(), 4);
  EXPECT_EQ(s5.train->stats().dropped_tokens, 22 - 1 - 4 * 5);
  const auto p5 = packed_stream(*s5.train);
  EXPECT_EQ(p5, std::vector<int64_t>(stream.begin(), stream.begin() + 21));

  // Batches carry the same numbers as int64 tensors.
  auto batch = qtune::make_batch(ds, {2, 0});
  EXPECT_EQ(batch.tokens.sizes(), (std::vector<int64_t>{2, T}));
  EXPECT_EQ(batch.tokens.scalar_type(), torch::kInt64);
  EXPECT_EQ(batch.targets.scalar_type(), torch::kInt64);
  EXPECT_EQ(batch.tokens[1][0].item<int64_t>(), stream[0]);
  EXPECT_EQ(batch.targets[0][T - 1].item<int64_t>(), stream[2 * T + T]);
  EXPECT_EQ(batch.num_targets, 2 * T);
  EXPECT_THROW(ds.get(ds.size()), std::out_of_range);
}

TEST(Data, TextErrorsNameTheFile) {
  auto msg = load_data_error(text_config("/nonexistent/dir/corpus.txt", 8));
  EXPECT_HAS(msg, "data.path");
  EXPECT_HAS(msg, "/nonexistent/dir/corpus.txt");

  const std::string tiny = write_temp_file("data", "tiny.txt", "hello\n\nworld\n");
  msg = load_data_error(text_config(tiny, 64));
  EXPECT_HAS(msg, tiny);
  EXPECT_HAS(msg, "14 tokens");  // ^hello$ ^world$
  EXPECT_HAS(msg, "data.seq_len + 1 = 65");

  msg = load_data_error(text_config(write_temp_file("data", "blank.txt", "\n  \n\n"), 8));
  EXPECT_HAS(msg, "holds no text");

  DataConfig c = text_config(tiny, 4);
  c.format = "csv";
  EXPECT_HAS(load_data_error(c), "data.format");
  c = text_config(tiny, 0);
  EXPECT_HAS(load_data_error(c), "data.seq_len must be >= 1, got 0");
  c = text_config(tiny, 4);
  c.val_fraction = 1.0;
  EXPECT_HAS(load_data_error(c), "data.val_fraction must be in [0, 1), got 1");
  c.val_fraction = 0.5;
  c.val_path = tiny;
  EXPECT_HAS(load_data_error(c), "exclusive");
  c = text_config(tiny, 4);
  c.val_path = "/nonexistent/val.txt";
  msg = load_data_error(c);
  EXPECT_HAS(msg, "data.val_path");
  EXPECT_HAS(msg, "/nonexistent/val.txt");
}

// ---------------------------------------------------------------------------------------------
// Alpaca

TEST(Data, AlpacaPromptIsStanfordAlpacaText) {
  EXPECT_EQ(qtune::alpaca_prompt("Add.", "1 and 2"),
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:");
  EXPECT_EQ(qtune::alpaca_prompt("Say hi.", ""),
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:");
  // Placeholder-looking text inside a field is left alone.
  EXPECT_NE(qtune::alpaca_prompt("{input}", "{instruction}")
                .find("### Instruction:\n{input}\n\n### Input:\n{instruction}\n\n### Response:"),
            std::string::npos);
}

TEST(Data, AlpacaMasksExactlyThePromptTokens) {
  const std::string path =
      write_temp_file("data", "alpaca.json",
                 R"([{"instruction": "Add.", "input": "1 and 2", "output": "3"},
          {"instruction": "Say hi.", "input": "", "output": "hi there", "extra": 1},
          {"instruction": "Name a color.", "output": "red"}])");
  const int64_t T = 300;
  auto splits = qtune::load_data(text_config(path, T), CharTokenizer());
  const auto& ds = *splits.train;
  ASSERT_EQ(ds.size(), 3);
  EXPECT_EQ(ds.stats().format, "alpaca");
  EXPECT_EQ(ds.stats().documents, 3);

  struct Rec {
    std::string instruction, input, output;
  };
  const Rec recs[] = {
      {"Add.", "1 and 2", "3"}, {"Say hi.", "", "hi there"}, {"Name a color.", "", "red"}};
  CharTokenizer tok;
  int64_t total_targets = 0;
  for (int i = 0; i < 3; ++i) {
    const auto prompt =
        tok.encode(qtune::alpaca_prompt(recs[i].instruction, recs[i].input), true, false);
    const auto response = tok.encode(recs[i].output, false, true);
    std::vector<int64_t> ids(prompt.begin(), prompt.end());
    ids.insert(ids.end(), response.begin(), response.end());
    const int64_t n = static_cast<int64_t>(ids.size());
    const int64_t p = static_cast<int64_t>(prompt.size());
    auto e = ds.get(i);
    ASSERT_EQ(static_cast<int64_t>(e.tokens.size()), T);
    int64_t counted = 0;
    for (int64_t j = 0; j < T; ++j) {
      EXPECT_EQ(e.tokens[j], j < n ? ids[j] : tok.eos_id()) << i << "," << j;  // pad = EOS
      const int64_t want = (j + 1 < n && j + 1 >= p) ? ids[j + 1] : kIgnoreIndex;
      EXPECT_EQ(e.targets[j], want) << i << "," << j;
      counted += e.targets[j] != kIgnoreIndex;
    }
    // The loss sees the response and its EOS, nothing of the prompt.
    EXPECT_EQ(counted, static_cast<int64_t>(recs[i].output.size()) + 1);
    EXPECT_EQ(e.targets[p - 2], kIgnoreIndex);
    EXPECT_EQ(e.targets[p - 1], ids[p]);  // the first response token
    total_targets += counted;
  }
  EXPECT_EQ(ds.stats().target_tokens, total_targets);
  EXPECT_EQ(qtune::make_batch(ds, {0, 1, 2}).num_targets, total_targets);
}

TEST(Data, AlpacaTruncationKeepsPartialResponsesAndDropsLostOnes) {
  const std::string long_prompt(100, 'x');
  const std::string path = write_temp_file("data",
      "trunc.jsonl", "{\"instruction\": \"Hi\", \"output\": \"" + std::string(80, 'y') +
                         "\"}\n\n{\"instruction\": \"" + long_prompt + "\", \"output\": \"z\"}\n");
  const int64_t p0 = 1 + static_cast<int64_t>(qtune::alpaca_prompt("Hi", "").size());
  // T+1 ids are kept: the prompt and 11 response tokens; the long prompt alone does not fit.
  const int64_t T = p0 + 10;
  auto splits = qtune::load_data(text_config(path, T), CharTokenizer());
  const auto& ds = *splits.train;
  ASSERT_EQ(ds.size(), 1);
  EXPECT_EQ(ds.stats().dropped_records, 1);
  auto e = ds.get(0);
  int64_t counted = 0;
  for (int64_t j = 0; j < T; ++j) counted += e.targets[j] != kIgnoreIndex;
  EXPECT_EQ(counted, 11);
  EXPECT_EQ(e.targets[T - 1], 'y' + 3);
  // The cut tail of the first record, and all of the second (a dropped record is lost whole).
  EXPECT_EQ(ds.stats().dropped_tokens,
            (81 - 11) + (1 + static_cast<int64_t>(qtune::alpaca_prompt(long_prompt, "").size()) +
                         2));

  // Nothing usable at all is an error.
  auto msg = load_data_error(text_config(path, 20));
  EXPECT_HAS(msg, path);
  EXPECT_HAS(msg, "no usable record");
}

TEST(Data, AlpacaErrorsNameFileRecordAndKey) {
  const std::string missing =
      write_temp_file("data", "missing.json", R"([{"instruction": "a", "output": "b"}, {"instruction": "c"}])");
  auto msg = load_data_error(text_config(missing, 64));
  EXPECT_HAS(msg, missing);
  EXPECT_HAS(msg, "record [1]");
  EXPECT_HAS(msg, "\"output\"");

  const std::string wrong_type =
      write_temp_file("data", "wrong.jsonl",
                 "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": 5, \"output\": "
                 "\"b\"}\n");
  msg = load_data_error(text_config(wrong_type, 64));
  EXPECT_HAS(msg, wrong_type);
  EXPECT_HAS(msg, "line 2");
  EXPECT_HAS(msg, "\"instruction\" must be a string");

  const std::string bad_input =
      write_temp_file("data", "badinput.json", R"([{"instruction": "a", "input": ["x"], "output": "b"}])");
  msg = load_data_error(text_config(bad_input, 64));
  EXPECT_HAS(msg, "record [0]");
  EXPECT_HAS(msg, "\"input\"");

  const std::string bad_jsonl = write_temp_file("data",
      "bad.jsonl", "{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"a\", ");
  msg = load_data_error(text_config(bad_jsonl, 64));
  EXPECT_HAS(msg, bad_jsonl);
  EXPECT_HAS(msg, "line 3");
  EXPECT_HAS(msg, "invalid JSON");

  const std::string bad_array = write_temp_file("data",
      "bad.json",
      "[\n{\"instruction\": \"a\", \"output\": \"b\"},\n{\"instruction\": \"a\" \"output\"}\n]");
  msg = load_data_error(text_config(bad_array, 64));
  EXPECT_HAS(msg, bad_array);
  EXPECT_HAS(msg, "line 3");
  EXPECT_HAS(msg, "invalid JSON");

  const std::string not_objects = write_temp_file("data", "numbers.json", "[1, 2]");
  msg = load_data_error(text_config(not_objects, 64));
  EXPECT_HAS(msg, "record [0]");

  // Forced alpaca on a text file says what it expected.
  DataConfig c = text_config(write_temp_file("data", "prose.txt", "just prose\n"), 64);
  c.format = "alpaca";
  EXPECT_HAS(load_data_error(c), "not Alpaca data");
}

TEST(Data, FormatDetection) {
  // JSON content in a file without a known extension is Alpaca; .txt is text even if it looks
  // like JSON; an explicit format wins.
  const std::string json = R"([{"instruction": "a", "output": "b"}])";
  auto s = qtune::load_data(text_config(write_temp_file("data", "records.dat", json), 256), CharTokenizer());
  EXPECT_EQ(s.train->stats().format, "alpaca");
  s = qtune::load_data(text_config(write_temp_file("data", "records.txt", json), 4), CharTokenizer());
  EXPECT_EQ(s.train->stats().format, "text");
  DataConfig c = text_config(write_temp_file("data", "records2.json", json), 4);
  c.format = "text";
  EXPECT_EQ(qtune::load_data(c, CharTokenizer()).train->stats().format, "text");
}

// ---------------------------------------------------------------------------------------------
// Split

TEST(Data, ValidationSplitHoldsOutWholeDocuments) {
  const std::string path = write_temp_file("data", "numbered.txt", numbered_documents(40));
  DataConfig c = text_config(path, 1);  // seq_len 1 drops nothing, so every document is visible
  c.val_fraction = 0.25;
  c.seed = 11;
  auto s = qtune::load_data(c, CharTokenizer());
  ASSERT_TRUE(s.val);
  EXPECT_EQ(s.val->stats().documents, 10);
  EXPECT_EQ(s.train->stats().documents, 30);
  const auto train = document_markers(*s.train);
  const auto val = document_markers(*s.val);
  EXPECT_EQ(train.size(), 30u);
  EXPECT_EQ(val.size(), 10u);
  for (int d : val) EXPECT_EQ(train.count(d), 0u) << "doc" << d << " in both splits";

  // The same seed gives the same split; another seed another one.
  EXPECT_EQ(document_markers(*qtune::load_data(c, CharTokenizer()).val), val);
  c.seed = 12;
  EXPECT_NE(document_markers(*qtune::load_data(c, CharTokenizer()).val), val);

  // Alpaca splits by record.
  std::string records = "[";
  for (int r = 0; r < 20; ++r)
    records += (r ? "," : "") + std::string("{\"instruction\": \"r") + std::to_string(r) +
               "\", \"output\": \"o\"}";
  DataConfig a = text_config(write_temp_file("data", "records.json", records + "]"), 256);
  a.val_fraction = 0.2;
  auto sa = qtune::load_data(a, CharTokenizer());
  EXPECT_EQ(sa.val->size(), 4);
  EXPECT_EQ(sa.train->size(), 16);
  std::set<std::string> seen;
  for (auto* ds : {sa.train.get(), sa.val.get()})
    for (int64_t i = 0; i < ds->size(); ++i) seen.insert(chars(ds->get(i).tokens).substr(0, 200));
  EXPECT_EQ(seen.size(), 20u);

  // A fraction that rounds to no document is an error, as is one that leaves no training data.
  c.val_fraction = 0.01;
  auto msg = load_data_error(c);
  EXPECT_HAS(msg, "data.val_fraction");
  EXPECT_HAS(msg, "holds out none");
  DataConfig two = text_config(write_temp_file("data", "two.txt", "a\n\nb\n"), 1);
  two.val_fraction = 0.9;
  EXPECT_HAS(load_data_error(two), "leaves no training");
  // A held-out split too short for one block names the split.
  DataConfig shortval = text_config(path, 200);
  shortval.val_fraction = 0.05;
  msg = load_data_error(shortval);
  EXPECT_HAS(msg, "validation split");
  EXPECT_HAS(msg, path);
}

TEST(Data, SeparateValidationFile) {
  DataConfig c = text_config(write_temp_file("data", "train.txt", numbered_documents(10)), 200);
  c.val_path = write_temp_file("data", "val.json", R"([{"instruction": "a", "output": "b"}])");
  auto s = qtune::load_data(c, CharTokenizer());
  EXPECT_EQ(s.train->stats().documents, 10);
  ASSERT_TRUE(s.val);
  EXPECT_EQ(s.val->stats().source, c.val_path);
  EXPECT_EQ(s.val->stats().format, "alpaca");
}

// ---------------------------------------------------------------------------------------------
// Loader

namespace {
std::shared_ptr<qtune::TokenDataset> blocks_dataset() {
  // 40 documents of ~30 tokens with seq_len 4: a few hundred examples.
  return qtune::load_data(text_config(write_temp_file("data", "loader.txt", numbered_documents(40)), 4),
                          CharTokenizer())
      .train;
}
std::vector<int64_t> first_column(const qtune::Batch& b) {
  auto c = b.tokens.select(1, 0).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}
}  // namespace

TEST(Data, SeededPermutationIsFixed) {
  auto p = qtune::seeded_permutation(10, 42);
  auto sorted = p;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 10; ++i) EXPECT_EQ(sorted[i], i);
  EXPECT_EQ(p, qtune::seeded_permutation(10, 42));
  EXPECT_NE(p, qtune::seeded_permutation(10, 43));
  // Pinned so the order never changes under a resumed run on another machine or compiler.
  EXPECT_EQ(p, (std::vector<int64_t>{1, 7, 9, 0, 3, 8, 4, 2, 5, 6}));
  EXPECT_TRUE(qtune::seeded_permutation(0, 1).empty());
  EXPECT_EQ(qtune::seeded_permutation(1, 1), std::vector<int64_t>{0});
}

TEST(Data, LoaderOrderIsSeededPerEpoch) {
  auto ds = blocks_dataset();
  const int64_t B = 8;
  DataLoader a(ds, B, 5), b(ds, B, 5), other(ds, B, 6);
  const int64_t bpe = ds->size() / B;
  EXPECT_EQ(a.batches_per_epoch(), bpe);
  ASSERT_GE(bpe, 10);

  std::vector<std::vector<int64_t>> epoch0, epoch1;
  std::set<std::string> rows;
  for (int64_t i = 0; i < bpe; ++i) {
    auto x = a.next();
    auto y = b.next();
    EXPECT_TRUE(torch::equal(x.tokens, y.tokens));
    EXPECT_TRUE(torch::equal(x.targets, y.targets));
    EXPECT_EQ(x.tokens.sizes(), (std::vector<int64_t>{B, 4}));
    epoch0.push_back(first_column(x));
    // Within an epoch no example repeats: each row is a distinct (position-unique) block.
    for (int64_t r = 0; r < B; ++r) {
      auto row = x.tokens[r];
      rows.insert(
          chars(std::vector<int64_t>(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + 4)) +
          std::to_string(x.targets[r][3].item<int64_t>()));
    }
    if (i == 0) EXPECT_FALSE(torch::equal(x.tokens, other.next().tokens));
  }
  EXPECT_EQ(a.epoch(), 1u);
  for (int64_t i = 0; i < bpe; ++i) epoch1.push_back(first_column(a.next()));
  EXPECT_NE(epoch0, epoch1);  // epoch e is shuffled with seed + e

  // Epoch 1 of seed 5 is epoch 0 of seed 6.
  DataLoader six(ds, B, 6);
  for (int64_t i = 0; i < bpe; ++i) EXPECT_EQ(first_column(six.next()), epoch1[i]);

  // Without shuffle, index order; without drop_last the last batch is short.
  DataLoader plain(ds, B, 5, /*shuffle=*/false, /*drop_last=*/false);
  EXPECT_TRUE(
      torch::equal(plain.next().tokens, qtune::make_batch(*ds, {0, 1, 2, 3, 4, 5, 6, 7}).tokens));
  EXPECT_EQ(plain.batches_per_epoch(), (ds->size() + B - 1) / B);
}

TEST(Data, LoaderStateRoundTripResumesTheSameBatches) {
  auto ds = blocks_dataset();
  DataLoader a(ds, 8, 77);
  const int64_t bpe = a.batches_per_epoch();
  for (int64_t i = 0; i < bpe - 3; ++i) a.next();
  // Through text, as a checkpoint would store it.
  const std::string saved = a.state().to_json().dump();
  const auto state = qtune::LoaderState::from_json(qtune::Json::parse(saved));
  EXPECT_EQ(state.epoch, 0u);
  EXPECT_EQ(state.index, bpe - 3);

  DataLoader b(ds, 8, 77);
  b.restore(state);
  for (int i = 0; i < 10; ++i) {  // crosses into epoch 1
    auto x = a.next();
    auto y = b.next();
    ASSERT_TRUE(torch::equal(x.tokens, y.tokens)) << "batch " << i;
    ASSERT_TRUE(torch::equal(x.targets, y.targets)) << "batch " << i;
  }
  EXPECT_EQ(a.state().to_json(), b.state().to_json());
  EXPECT_EQ(b.state().epoch, 1u);

  auto restore_error = [&](DataLoader& l, const qtune::LoaderState& s) -> std::string {
    try {
      l.restore(s);
    } catch (const qtune::UserError& e) {
      return e.what();
    }
    return "";
  };
  DataLoader wrong_batch(ds, 4, 77);
  auto msg = restore_error(wrong_batch, state);
  EXPECT_HAS(msg, "batch_size 8");
  DataLoader wrong_seed(ds, 8, 78);
  EXPECT_HAS(restore_error(wrong_seed, state), "seed 77");
  auto past_end = state;
  past_end.index = bpe;
  EXPECT_HAS(restore_error(b, past_end), "batch index");

  auto j = qtune::Json::parse(saved);
  j.erase("epoch");
  try {
    qtune::LoaderState::from_json(j);
    ADD_FAILURE() << "missing epoch accepted";
  } catch (const qtune::UserError& e) {
    EXPECT_HAS(std::string(e.what()), "'epoch'");
  }
}

TEST(Data, LoaderNeedsOneFullBatch) {
  auto ds = blocks_dataset();
  try {
    DataLoader l(ds, ds->size() + 1, 0);
    ADD_FAILURE() << "batch larger than the dataset accepted";
  } catch (const qtune::UserError& e) {
    EXPECT_HAS(std::string(e.what()), "batch_size");
    EXPECT_HAS(std::string(e.what()), "loader.txt");
  }
  EXPECT_THROW(DataLoader(ds, 0, 0), qtune::UserError);
}

TEST(Data, EvalBatchesInFixedOrderWithCap) {
  auto ds = blocks_dataset();
  const int64_t B = 16;
  std::vector<qtune::Batch> seen;
  const int64_t n =
      qtune::for_each_eval_batch(*ds, B, 0, [&](const qtune::Batch& b) { seen.push_back(b); });
  EXPECT_EQ(n, (ds->size() + B - 1) / B);
  ASSERT_EQ(static_cast<int64_t>(seen.size()), n);
  int64_t rows = 0;
  for (const auto& b : seen) rows += b.tokens.size(0);
  EXPECT_EQ(rows, ds->size());
  EXPECT_TRUE(torch::equal(seen[1].tokens[0], qtune::make_batch(*ds, {B}).tokens[0]));
  std::vector<qtune::Batch> capped;
  EXPECT_EQ(
      qtune::for_each_eval_batch(*ds, B, 2, [&](const qtune::Batch& b) { capped.push_back(b); }),
      2);
  ASSERT_EQ(capped.size(), 2u);
  EXPECT_TRUE(torch::equal(capped[1].tokens, seen[1].tokens));
}

// ---------------------------------------------------------------------------------------------
// Shared data with the real tokenizer

TEST(Data, RealTokenizerOnSharedData) {
  auto tok = qtune::load_tokenizer(qtune::test::data_path("tok512.bin"));
  DataConfig c;
  c.path = qtune::test::data_path("tinyshakespeare.txt");
  c.seq_len = 256;
  c.val_fraction = 0.1;
  auto s = qtune::load_data(c, *tok);
  ASSERT_TRUE(s.train && s.val);
  EXPECT_GT(s.train->size(), 100);
  EXPECT_GT(s.val->size(), 10);
  EXPECT_GT(s.train->stats().documents, 5 * s.val->stats().documents);
  // Every document begins with BOS: the first block of the file starts with one.
  const auto first = s.train->get(0);
  EXPECT_EQ(first.tokens[0], tok->bos_id());
  for (int64_t id : first.tokens) EXPECT_TRUE(id >= 0 && id < tok->vocab_size());

  DataConfig a;
  a.path = qtune::test::data_path("alpaca_sample102.json");
  a.seq_len = 256;
  auto sa = qtune::load_data(a, *tok);
  EXPECT_EQ(sa.train->stats().format, "alpaca");
  EXPECT_EQ(sa.train->stats().documents, 102);
  EXPECT_EQ(sa.train->size() + sa.train->stats().dropped_records, 102);
  // The masked prefix is exactly BOS + the prompt: the first counted target follows
  // "### Response:".
  for (int64_t i = 0; i < 5; ++i) {
    const auto e = sa.train->get(i);
    int64_t p = 0;
    while (p < a.seq_len && e.targets[p] == kIgnoreIndex) ++p;
    ASSERT_LT(p, a.seq_len);
    std::vector<int> prefix(e.tokens.begin(), e.tokens.begin() + p + 1);
    const std::string text = tok->decode(prefix);
    EXPECT_EQ(text.substr(text.size() - 13), "### Response:") << text;
    EXPECT_EQ(text.rfind("Below is an instruction", 0), 0u) << text;
  }
}
