// The data pipeline: reading text, Alpaca and chat files, tokenising, cutting into blocks or
// masking everything but the answers, the overlong-record policy, packing several examples per
// sequence, the document-level validation split, and the deterministic, resumable batch loader.
#include "qtune/data.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>

#include "chat_data.h"
#include "qtune/chat_template.h"
#include "qtune/error.h"
#include "qtune/options.h"
#include "qtune/tokenizer.h"

namespace fs = std::filesystem;

namespace qtune {

TokenDataset::~TokenDataset() = default;

void TokenDataset::fill_segments(int64_t, int64_t*, int64_t*) const {
  throw std::logic_error("fill_segments on a dataset that is not packed");
}

namespace {

using data_detail::first_non_blank;
using data_detail::is_blank;
using data_detail::JsonRecord;
using data_detail::RecordErrors;

// ---------------------------------------------------------------------------------------------
// Reading files

// `key` is the config key the path came from, so the message says what to fix.
std::string read_text_file(const std::string& path, const std::string& key) {
  std::error_code ec;
  QTUNE_CHECK(fs::exists(path, ec), key, ": file '", path, "' does not exist");
  QTUNE_CHECK(fs::is_regular_file(path, ec), key, ": '", path, "' is not a regular file");
  std::ifstream in(path, std::ios::binary);
  QTUNE_CHECK(in.good(), key, ": cannot open '", path, "' for reading");
  std::ostringstream ss;
  ss << in.rdbuf();
  QTUNE_CHECK(!in.bad(), key, ": error while reading '", path, "'");
  std::string text = ss.str();
  if (text.compare(0, 3, "\xEF\xBB\xBF") == 0) text.erase(0, 3);  // UTF-8 byte order mark
  return text;
}

std::string lower_extension(const std::string& path) {
  std::string ext = fs::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext;
}

// data.format auto before the records are read: text by extension or content; "records" (JSON)
// is classified by its first record later.
std::string resolve_format(const std::string& format, const std::string& path,
                           const std::string& text) {
  if (format != "auto") return format;
  const std::string ext = lower_extension(path);
  if (ext == ".txt" || ext == ".text" || ext == ".md") return "text";
  if (ext == ".json" || ext == ".jsonl") return "records";
  const char c = first_non_blank(text);
  return (c == '[' || c == '{') ? "records" : "text";
}

// ---------------------------------------------------------------------------------------------
// Plain text

// Documents are separated by one or more blank lines; CRLF line ends are normalised.
std::vector<std::string> split_documents(const std::string& text) {
  std::vector<std::string> docs;
  std::string doc;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(start, end - start);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (is_blank(line)) {
      if (!doc.empty()) docs.push_back(std::move(doc));
      doc.clear();
    } else {
      if (!doc.empty()) doc += '\n';
      doc += line;
    }
    start = end + 1;
  }
  if (!doc.empty()) docs.push_back(std::move(doc));
  return docs;
}

// Blocks of T+1 tokens over one stream, consecutive blocks sharing a token.
class PackedTextDataset : public TokenDataset {
 public:
  PackedTextDataset(std::vector<int32_t> stream, int64_t seq_len, DatasetStats stats)
      : stream_(std::move(stream)), seq_len_(seq_len), stats_(std::move(stats)) {
    const int64_t n = static_cast<int64_t>(stream_.size());
    blocks_ = n > seq_len_ ? (n - 1) / seq_len_ : 0;
    stats_.examples = blocks_;
    stats_.target_tokens = blocks_ * seq_len_;
    stats_.dropped_tokens = blocks_ > 0 ? n - 1 - blocks_ * seq_len_ : n;
  }
  int64_t size() const override { return blocks_; }
  int64_t seq_len() const override { return seq_len_; }
  Example get(int64_t i) const override {
    Example e;
    e.tokens.resize(seq_len_);
    e.targets.resize(seq_len_);
    fill(i, e.tokens.data(), e.targets.data());
    return e;
  }
  int64_t fill(int64_t i, int64_t* tokens, int64_t* targets) const override {
    if (i < 0 || i >= blocks_)
      throw std::out_of_range(detail::concat("example ", i, " out of range [0, ", blocks_, ")"));
    const int32_t* block = stream_.data() + i * seq_len_;
    for (int64_t j = 0; j < seq_len_; ++j) {
      tokens[j] = block[j];
      targets[j] = block[j + 1];
    }
    return seq_len_;
  }
  const DatasetStats& stats() const override { return stats_; }

 private:
  std::vector<int32_t> stream_;
  int64_t seq_len_;
  int64_t blocks_ = 0;
  DatasetStats stats_;
};

std::vector<int32_t> tokenize_documents(const std::vector<std::string>& docs,
                                        const std::vector<int64_t>& which,
                                        const Tokenizer& tokenizer) {
  std::vector<int32_t> stream;
  for (int64_t d : which) {
    const std::vector<int> ids = tokenizer.encode(docs[d], /*bos=*/true, /*eos=*/true);
    stream.insert(stream.end(), ids.begin(), ids.end());
  }
  return stream;
}

std::shared_ptr<TokenDataset> make_text_split(const std::vector<std::string>& docs,
                                              const std::vector<int64_t>& which,
                                              const Tokenizer& tokenizer, int64_t seq_len,
                                              const std::string& source, const std::string& what) {
  DatasetStats stats;
  stats.source = source;
  stats.format = "text";
  stats.documents = static_cast<int64_t>(which.size());
  std::vector<int32_t> stream = tokenize_documents(docs, which, tokenizer);
  stats.tokens = static_cast<int64_t>(stream.size());
  auto ds = std::make_shared<PackedTextDataset>(std::move(stream), seq_len, std::move(stats));
  QTUNE_CHECK(ds->size() > 0, what, " from '", source, "' has ", ds->stats().tokens, " tokens in ",
              ds->stats().documents, " documents, fewer than data.seq_len + 1 = ", seq_len + 1,
              " needed for one block; lower data.seq_len or use more text");
  return ds;
}

// ---------------------------------------------------------------------------------------------
// Records: one token sequence per record, the loss on some of its tokens

// ids of one record (BOS ... EOS) and, per id, whether it is a target that counts (the first id
// is never a target).
struct Item {
  std::vector<int32_t> ids;
  std::vector<uint8_t> loss;
};

int64_t item_targets(const Item& it) {
  return std::accumulate(it.loss.begin() + (it.loss.empty() ? 0 : 1), it.loss.end(), int64_t{0});
}

// Writes one item's n-1 inputs and targets at t[0..n-1); the rest of the row is the caller's.
int64_t write_item(const Item& it, int64_t* tokens, int64_t* targets) {
  const int64_t n = static_cast<int64_t>(it.ids.size());
  int64_t counted = 0;
  for (int64_t j = 0; j + 1 < n; ++j) {
    tokens[j] = it.ids[j];
    // Position j predicts ids[j+1].
    const bool counts = it.loss[j + 1] != 0;
    targets[j] = counts ? it.ids[j + 1] : kIgnoreIndex;
    counted += counts;
  }
  return counted;
}

void check_index(int64_t i, int64_t size) {
  if (i < 0 || i >= size)
    throw std::out_of_range(detail::concat("example ", i, " out of range [0, ", size, ")"));
}

// One record per example, right-padded with input `pad_id` and ignored targets.
class RecordDataset : public TokenDataset {
 public:
  RecordDataset(std::vector<Item> items, int64_t seq_len, int32_t pad_id, DatasetStats stats)
      : items_(std::move(items)), seq_len_(seq_len), pad_id_(pad_id), stats_(std::move(stats)) {
    stats_.examples = static_cast<int64_t>(items_.size());
    for (const auto& it : items_) {
      stats_.target_tokens += item_targets(it);
      stats_.padding_tokens += seq_len_ - (static_cast<int64_t>(it.ids.size()) - 1);
    }
  }
  int64_t size() const override { return static_cast<int64_t>(items_.size()); }
  int64_t seq_len() const override { return seq_len_; }
  Example get(int64_t i) const override {
    Example e;
    e.tokens.resize(seq_len_);
    e.targets.resize(seq_len_);
    fill(i, e.tokens.data(), e.targets.data());
    return e;
  }
  int64_t fill(int64_t i, int64_t* tokens, int64_t* targets) const override {
    check_index(i, size());
    const Item& it = items_[i];
    const int64_t n = static_cast<int64_t>(it.ids.size());
    const int64_t counted = write_item(it, tokens, targets);
    // The last id is an input too (it predicts nothing), as a model sees a whole record.
    for (int64_t j = n - 1; j < seq_len_; ++j) {
      tokens[j] = j < n ? it.ids[j] : pad_id_;
      targets[j] = kIgnoreIndex;
    }
    return counted;
  }
  const DatasetStats& stats() const override { return stats_; }

 private:
  std::vector<Item> items_;
  int64_t seq_len_;
  int32_t pad_id_;
  DatasetStats stats_;
};

// data.pack: records placed one after another in each example, greedily in file order (a record
// that does not fit starts the next example), as torchtune's PackedDataset does. A record of n
// ids takes n-1 positions: its inputs ids[0..n-1) predicting ids[1..n), so no target lies across
// a boundary; positions restart at 0 and segment ids count 1, 2, ... per record, 0 is padding.
class PackedRecordDataset : public TokenDataset {
 public:
  PackedRecordDataset(std::vector<Item> items, int64_t seq_len, int32_t pad_id, DatasetStats stats)
      : items_(std::move(items)), seq_len_(seq_len), pad_id_(pad_id), stats_(std::move(stats)) {
    int64_t used = seq_len_;  // positions filled in the current example; full = start one
    for (size_t k = 0; k < items_.size(); ++k) {
      const int64_t need = static_cast<int64_t>(items_[k].ids.size()) - 1;
      if (used + need > seq_len_) {
        starts_.push_back(k);
        used = 0;
      }
      used += need;
      stats_.target_tokens += item_targets(items_[k]);
    }
    starts_.push_back(items_.size());
    stats_.examples = size();
    stats_.packed_records = static_cast<int64_t>(items_.size());
    int64_t inputs = 0;
    for (const auto& it : items_) inputs += static_cast<int64_t>(it.ids.size()) - 1;
    stats_.padding_tokens = size() * seq_len_ - inputs;
  }
  int64_t size() const override { return static_cast<int64_t>(starts_.size()) - 1; }
  int64_t seq_len() const override { return seq_len_; }
  bool packed() const override { return true; }
  Example get(int64_t i) const override {
    Example e;
    e.tokens.resize(seq_len_);
    e.targets.resize(seq_len_);
    fill(i, e.tokens.data(), e.targets.data());
    return e;
  }
  int64_t fill(int64_t i, int64_t* tokens, int64_t* targets) const override {
    check_index(i, size());
    int64_t at = 0, counted = 0;
    for (size_t k = starts_[i]; k < starts_[i + 1]; ++k) {
      counted += write_item(items_[k], tokens + at, targets + at);
      at += static_cast<int64_t>(items_[k].ids.size()) - 1;
    }
    for (; at < seq_len_; ++at) {
      tokens[at] = pad_id_;
      targets[at] = kIgnoreIndex;
    }
    return counted;
  }
  void fill_segments(int64_t i, int64_t* positions, int64_t* segments) const override {
    check_index(i, size());
    int64_t at = 0, segment = 0;
    for (size_t k = starts_[i]; k < starts_[i + 1]; ++k) {
      ++segment;
      const int64_t n = static_cast<int64_t>(items_[k].ids.size()) - 1;
      for (int64_t j = 0; j < n; ++j, ++at) {
        positions[at] = j;
        segments[at] = segment;
      }
    }
    for (int64_t j = 0; at < seq_len_; ++j, ++at) {
      positions[at] = j;
      segments[at] = 0;
    }
  }
  const DatasetStats& stats() const override { return stats_; }

 private:
  std::vector<Item> items_;
  std::vector<size_t> starts_;  // example e holds items [starts_[e], starts_[e+1])
  int64_t seq_len_;
  int32_t pad_id_;
  DatasetStats stats_;
};

// What a split of records is made from: the items in file order and how they were rendered.
struct RecordCorpus {
  std::string source, format, chat_template;
  std::vector<Item> items;
};

// The overlong policy, dropping records without a target, then one example per record or packed.
std::shared_ptr<TokenDataset> make_record_split(const RecordCorpus& corpus,
                                                const std::vector<int64_t>& which,
                                                const DataConfig& config,
                                                const Tokenizer& tokenizer,
                                                const std::string& what) {
  const int64_t limit = config.seq_len + 1;
  DatasetStats stats;
  stats.source = corpus.source;
  stats.format = corpus.format;
  stats.chat_template = corpus.chat_template;
  stats.documents = static_cast<int64_t>(which.size());
  std::vector<Item> items;
  items.reserve(which.size());
  int64_t first_long = -1, first_empty = -1, empty = 0;
  for (int64_t r : which) {
    Item item = corpus.items[r];
    const int64_t n = static_cast<int64_t>(item.ids.size());
    stats.tokens += n;
    if (n > limit) {
      if (first_long < 0) first_long = r;
      if (config.overlong == "drop") {
        ++stats.dropped_records;
        stats.dropped_tokens += n;
        continue;
      }
      ++stats.truncated_records;
      stats.dropped_tokens += n - limit;
      item.ids.resize(limit);
      item.loss.resize(limit);
    }
    if (item_targets(item) == 0) {
      // Nothing of the answer survives: no loss term, only wasted compute.
      ++stats.dropped_records;
      ++empty;
      stats.dropped_tokens += static_cast<int64_t>(item.ids.size());
      if (first_empty < 0) first_empty = r;
      continue;
    }
    items.push_back(std::move(item));
  }
  const int64_t too_long = stats.truncated_records + (stats.dropped_records - empty);
  if (too_long > 0)
    spdlog::info("{}: {} of {} records are longer than data.seq_len + 1 = {} tokens (record [{}] "
                 "first): {} (data.overlong: {})",
                 corpus.source, too_long, which.size(), limit, first_long,
                 config.overlong == "drop" ? "dropped" : "truncated", config.overlong);
  if (empty > 0)
    spdlog::warn("{}: {} of {} records dropped (record [{}] first): no target left within "
                 "data.seq_len = {}",
                 corpus.source, empty, which.size(), first_empty, config.seq_len);
  const int eos = tokenizer.eos_id();
  const int32_t pad = eos >= 0 ? eos : 0;
  std::shared_ptr<TokenDataset> ds;
  if (config.pack)
    ds = std::make_shared<PackedRecordDataset>(std::move(items), config.seq_len, pad,
                                               std::move(stats));
  else
    ds = std::make_shared<RecordDataset>(std::move(items), config.seq_len, pad, std::move(stats));
  QTUNE_CHECK(ds->size() > 0, what, " from '", corpus.source, "' has no usable record (",
              ds->stats().documents, " records, ", ds->stats().dropped_records,
              " dropped as longer than data.seq_len = ", config.seq_len,
              " or without a target; see data.overlong)");
  return ds;
}

// data.pack on plain text: each document (BOS + text + EOS) is its own segment, cut into pieces
// of at most seq_len + 1 ids that share one id (so every token but a document's first is a
// target exactly once) before packing.
RecordCorpus text_pieces(const std::vector<std::string>& docs, const Tokenizer& tokenizer,
                         int64_t seq_len, const std::string& source) {
  RecordCorpus c;
  c.source = source;
  c.format = "text";
  for (const auto& doc : docs) {
    const std::vector<int> ids = tokenizer.encode(doc, /*bos=*/true, /*eos=*/true);
    Item item;
    for (size_t start = 0; start + 1 < ids.size(); start += static_cast<size_t>(seq_len)) {
      const size_t end = std::min(ids.size(), start + static_cast<size_t>(seq_len) + 1);
      item.ids.assign(ids.begin() + static_cast<std::ptrdiff_t>(start),
                      ids.begin() + static_cast<std::ptrdiff_t>(end));
      item.loss.assign(item.ids.size(), 1);
      c.items.push_back(item);
    }
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// Alpaca

// Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca, train.py), character for character.
constexpr const char* kPromptInput =
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";
constexpr const char* kPromptNoInput =
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:";

void replace_once(std::string& s, const std::string& what, const std::string& with) {
  const size_t at = s.find(what);
  if (at != std::string::npos) s.replace(at, what.size(), with);
}

struct AlpacaRecord {
  std::string instruction, input, output;
};

// `where` is "<file> record [i]" or "<file> line n".
AlpacaRecord parse_record(const Json& j, const std::string& where) {
  QTUNE_CHECK(j.is_object(), where,
              ": expected an object with \"instruction\" and \"output\", got ", j.type_name());
  AlpacaRecord r;
  for (const char* key : {"instruction", "output"}) {
    QTUNE_CHECK(j.contains(key), where, ": key \"", key, "\" is missing");
    QTUNE_CHECK(j[key].is_string(), where, ": key \"", key, "\" must be a string, got ",
                j[key].type_name(), " ", j[key].dump());
  }
  r.instruction = j["instruction"].get<std::string>();
  r.output = j["output"].get<std::string>();
  if (j.contains("input") && !j["input"].is_null()) {
    QTUNE_CHECK(j["input"].is_string(), where, ": key \"input\" must be a string, got ",
                j["input"].type_name(), " ", j["input"].dump());
    r.input = j["input"].get<std::string>();
  }
  return r;
}

// BOS + prompt + response + EOS, the prompt and the response tokenised separately so the
// boundary is exact (the tokenizer's dummy-prefix space separates "Response:" from the answer).
Item alpaca_item(const AlpacaRecord& rec, const Tokenizer& tokenizer, bool train_on_prompt) {
  const std::vector<int> prompt =
      tokenizer.encode(alpaca_prompt(rec.instruction, rec.input), /*bos=*/true, /*eos=*/false);
  const std::vector<int> response = tokenizer.encode(rec.output, /*bos=*/false, /*eos=*/true);
  Item item;
  item.ids.assign(prompt.begin(), prompt.end());
  item.ids.insert(item.ids.end(), response.begin(), response.end());
  item.loss.assign(item.ids.size(), 1);
  item.loss[0] = 0;
  if (!train_on_prompt) std::fill(item.loss.begin(), item.loss.begin() + prompt.size(), 0);
  return item;
}

// ---------------------------------------------------------------------------------------------
// Chat

Item chat_item(const ChatTemplate& tmpl, const Conversation& conv, const Tokenizer& tokenizer,
               bool train_on_prompt) {
  ChatTokens t = tmpl.encode(conv, /*add_generation_prompt=*/false, tokenizer);
  Item item;
  item.ids.assign(t.ids.begin(), t.ids.end());
  item.loss = std::move(t.assistant);
  if (train_on_prompt) std::fill(item.loss.begin(), item.loss.end(), 1);
  if (!item.loss.empty()) item.loss[0] = 0;
  return item;
}

std::string builtin_list() {
  std::string known;
  for (const auto& n : ChatTemplate::builtin_names()) known += (known.empty() ? "" : ", ") + n;
  return known;
}

// data.template: a named built-in, or ("auto") the one the model's own template maps to.
ChatTemplate resolve_template(const DataConfig& c) {
  const std::string origin =
      c.model_chat_template_origin.empty() ? "the model" : c.model_chat_template_origin;
  if (c.chat_template != "auto") {
    ChatTemplate t = ChatTemplate::builtin(c.chat_template, "data.template");
    if (!c.model_chat_template.empty()) {
      try {
        const ChatTemplate own = ChatTemplate::from_jinja(c.model_chat_template, origin);
        if (own.name() != t.name())
          spdlog::warn("data.template: {} although {} has the {} template", t.name(), origin,
                       own.name());
      } catch (const UserError&) {
        // A template qtune does not know: the user's choice is all there is.
      }
    }
    return t;
  }
  QTUNE_CHECK(!c.model_chat_template.empty(), "data.template: auto takes the model's chat template, "
              "but ", origin, " has none (no chat_template in tokenizer_config.json); set "
              "data.template to one of: ", builtin_list());
  ChatTemplate t = ChatTemplate::from_jinja(c.model_chat_template, origin);
  spdlog::info("data.template: {} (the chat template of {})", t.name(), origin);
  return t;
}

// Reads, checks and tokenises every record of a JSON / JSONL file.
RecordCorpus read_records(const std::string& path, const std::string& text, std::string format,
                          const DataConfig& config, const Tokenizer& tokenizer) {
  RecordErrors errors;
  const bool alpaca_hint = format == "alpaca";
  std::vector<JsonRecord> records = data_detail::read_json_records(
      path, text, alpaca_hint ? "Alpaca data" : format == "records" ? "JSON records" : format + " data",
      alpaca_hint ? "{\"instruction\", \"input\", \"output\"} objects"
                  : "{\"messages\": [{\"role\", \"content\"}, ...]} objects",
      errors);
  if (format == "records") {
    if (records.empty()) errors.throw_if_any(path);  // no record parses: say why
    format = data_detail::detect_record_format(records[0], config);
    spdlog::info("data.format auto: {} is {} data (from the keys of {})", path, format,
                 records[0].where);
  }
  RecordCorpus corpus;
  corpus.source = path;
  corpus.format = format;
  const bool templated = format != "alpaca" || config.chat_template != "auto";
  std::optional<ChatTemplate> tmpl;
  if (templated) {
    tmpl = resolve_template(config);
    corpus.chat_template = tmpl->name();
  }
  corpus.items.reserve(records.size());
  for (const JsonRecord& r : records) {
    try {
      if (format == "alpaca") {
        const AlpacaRecord rec = parse_record(r.value, r.where);
        if (!templated) {
          corpus.items.push_back(alpaca_item(rec, tokenizer, config.train_on_prompt));
          continue;
        }
        // One exchange; the input follows the instruction as in Alpaca's own prompt.
        const Conversation conv = {
            {"user", rec.input.empty() ? rec.instruction : rec.instruction + "\n\n" + rec.input},
            {"assistant", rec.output}};
        corpus.items.push_back(chat_item(*tmpl, conv, tokenizer, config.train_on_prompt));
      } else {
        const Conversation conv = data_detail::parse_conversation(r, format, config);
        try {
          corpus.items.push_back(chat_item(*tmpl, conv, tokenizer, config.train_on_prompt));
        } catch (const UserError& e) {
          throw UserError(r.where + ": " + e.what());
        }
      }
    } catch (const UserError& e) {
      errors.add(r.order, e.what());
    }
  }
  errors.throw_if_any(path);
  return corpus;
}

// ---------------------------------------------------------------------------------------------
// Splits

std::vector<int64_t> all_indices(int64_t n) {
  std::vector<int64_t> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

// Held-out indices are the first round(fraction * n) of a seeded permutation; both halves are
// returned in file order.
std::pair<std::vector<int64_t>, std::vector<int64_t>> split_indices(int64_t n, double fraction,
                                                                    uint64_t seed,
                                                                    const std::string& source,
                                                                    const char* unit) {
  const int64_t n_val = std::llround(fraction * static_cast<double>(n));
  QTUNE_CHECK(n_val > 0, "data.val_fraction = ", fraction, " of ", n, " ", unit, " in '", source,
              "' holds out none; raise data.val_fraction or give data.val_path");
  QTUNE_CHECK(n_val < n, "data.val_fraction = ", fraction, " of ", n, " ", unit, " in '", source,
              "' leaves no training ", unit, "; lower data.val_fraction or give data.val_path");
  // A stream of its own, so the split does not mirror the loader's epoch-0 order.
  std::vector<int64_t> perm = seeded_permutation(n, seed ^ 0x5851F42D4C957F2DULL);
  std::vector<int64_t> val(perm.begin(), perm.begin() + n_val);
  std::vector<int64_t> train(perm.begin() + n_val, perm.end());
  std::sort(val.begin(), val.end());
  std::sort(train.begin(), train.end());
  return {train, val};
}

void log_split(const char* name, const TokenDataset& ds) {
  const auto& s = ds.stats();
  const bool records = s.format != "text";
  spdlog::info("data {}: {} ({}{}{}): {} {}, {} tokens -> {} {}examples of {} tokens, {} targets, "
               "{:.1f}% padding",
               name, s.source, s.format, s.chat_template.empty() ? "" : ", template ",
               s.chat_template, s.documents, records ? "records" : "documents", s.tokens,
               s.examples, ds.packed() ? "packed " : "", ds.seq_len(), s.target_tokens,
               100.0 * static_cast<double>(s.padding_tokens) /
                   std::max<double>(1.0, static_cast<double>(s.examples * ds.seq_len())));
}

void check_config(const DataConfig& c) {
  QTUNE_CHECK(!c.path.empty(), "data.path is required (a text, JSON or JSONL file)");
  QTUNE_CHECK(c.format == "auto" || c.format == "text" || c.format == "alpaca" ||
                  c.format == "messages" || c.format == "sharegpt",
              "data.format must be auto, text, alpaca, messages or sharegpt, got '", c.format, "'");
  QTUNE_CHECK(c.seq_len >= 1, "data.seq_len must be >= 1, got ", c.seq_len);
  QTUNE_CHECK(c.val_fraction >= 0 && c.val_fraction < 1,
              "data.val_fraction must be in [0, 1), got ", c.val_fraction);
  QTUNE_CHECK(c.val_path.empty() || c.val_fraction == 0,
              "data.val_path and data.val_fraction are exclusive (got val_path '", c.val_path,
              "' and val_fraction ", c.val_fraction, ")");
  QTUNE_CHECK(c.overlong == "truncate" || c.overlong == "drop",
              "data.overlong must be truncate or drop, got '", c.overlong, "'");
  if (c.chat_template != "auto") ChatTemplate::builtin(c.chat_template, "data.template");
}

// One data file read and tokenised: text documents, or records.
struct Corpus {
  std::string path;
  bool text = false;
  std::vector<std::string> docs;
  RecordCorpus records;
  int64_t size() const {
    return static_cast<int64_t>(text ? docs.size() : records.items.size());
  }
};

Corpus read_corpus(const std::string& path, const std::string& key, const DataConfig& config,
                   const Tokenizer& tokenizer) {
  Corpus c;
  c.path = path;
  const std::string content = read_text_file(path, key);
  const std::string format = resolve_format(config.format, path, content);
  c.text = format == "text";
  if (c.text) {
    // A NUL byte is never text: a binary file (a checkpoint, an archive) given as data.
    const auto nul = content.find('\0');
    QTUNE_CHECK(nul == std::string::npos, key, ": '", path, "' is not a text file (a NUL byte at ",
                "offset ", nul, "); give a text, JSON or JSONL file");
    c.docs = split_documents(content);
    QTUNE_CHECK(!c.docs.empty(), key, ": '", path, "' holds no text");
  } else {
    c.records = read_records(path, content, format, config, tokenizer);
  }
  return c;
}

std::shared_ptr<TokenDataset> make_split(const Corpus& c, const std::vector<int64_t>& which,
                                         const DataConfig& config, const Tokenizer& tokenizer,
                                         const std::string& what) {
  if (!c.text) return make_record_split(c.records, which, config, tokenizer, what);
  if (!config.pack) return make_text_split(c.docs, which, tokenizer, config.seq_len, c.path, what);
  std::vector<std::string> docs;
  for (int64_t d : which) docs.push_back(c.docs[d]);
  const RecordCorpus pieces = text_pieces(docs, tokenizer, config.seq_len, c.path);
  return make_record_split(pieces, all_indices(static_cast<int64_t>(pieces.items.size())), config,
                           tokenizer, what);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public API

std::string alpaca_prompt(const std::string& instruction, const std::string& input) {
  // Same condition as Alpaca's train.py: the input variant only for a non-empty input.
  std::string p = input.empty() ? kPromptNoInput : kPromptInput;
  // {input} follows {instruction} in the template and is filled first, so each find() hits the
  // template's own placeholder even when a field's text contains "{input}" or "{instruction}".
  if (!input.empty()) replace_once(p, "{input}", input);
  replace_once(p, "{instruction}", instruction);
  return p;
}

DataSplits load_data(const DataConfig& config, const Tokenizer& tokenizer) {
  check_config(config);
  DataSplits out;
  const Corpus train = read_corpus(config.path, "data.path", config, tokenizer);
  std::vector<int64_t> train_idx = all_indices(train.size());
  if (config.val_fraction > 0) {
    auto [kept, held_out] = split_indices(train.size(), config.val_fraction, config.seed,
                                          config.path, train.text ? "documents" : "records");
    train_idx = std::move(kept);
    out.val = make_split(train, held_out, config, tokenizer, "the validation split");
  }
  out.train = make_split(train, train_idx, config, tokenizer, "the training split");
  if (!config.val_path.empty()) {
    const Corpus val = read_corpus(config.val_path, "data.val_path", config, tokenizer);
    out.val = make_split(val, all_indices(val.size()), config, tokenizer, "the validation file");
  }
  log_split("train", *out.train);
  if (out.val) log_split("val", *out.val);
  return out;
}

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> v = all_indices(n);
  std::mt19937_64 rng(seed);
  // Fisher-Yates with unbiased bounded draws (rejection below 2^64 mod range). std::shuffle and
  // std::uniform_int_distribution are implementation-defined, so they are avoided on purpose.
  for (int64_t i = n - 1; i > 0; --i) {
    const uint64_t range = static_cast<uint64_t>(i) + 1;
    const uint64_t threshold = (0 - range) % range;
    uint64_t r;
    do {
      r = rng();
    } while (r < threshold);
    std::swap(v[i], v[static_cast<int64_t>(r % range)]);
  }
  return v;
}

Batch make_batch(const TokenDataset& dataset, const std::vector<int64_t>& indices) {
  const int64_t b = static_cast<int64_t>(indices.size());
  const int64_t t = dataset.seq_len();
  Batch batch;
  batch.tokens = torch::empty({b, t}, torch::kInt64);
  batch.targets = torch::empty({b, t}, torch::kInt64);
  int64_t* tok = batch.tokens.data_ptr<int64_t>();
  int64_t* tgt = batch.targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < b; ++r)
    batch.num_targets += dataset.fill(indices[r], tok + r * t, tgt + r * t);
  if (dataset.packed()) {
    batch.positions = torch::empty({b, t}, torch::kInt64);
    batch.segments = torch::empty({b, t}, torch::kInt64);
    int64_t* pos = batch.positions.data_ptr<int64_t>();
    int64_t* seg = batch.segments.data_ptr<int64_t>();
    for (int64_t r = 0; r < b; ++r) dataset.fill_segments(indices[r], pos + r * t, seg + r * t);
  }
  return batch;
}

int64_t for_each_eval_batch(const TokenDataset& dataset, int64_t batch_size, int64_t max_batches,
                            const std::function<void(const Batch&)>& fn) {
  QTUNE_CHECK(batch_size >= 1, "eval batch size must be >= 1, got ", batch_size);
  int64_t done = 0;
  std::vector<int64_t> idx;
  for (int64_t start = 0; start < dataset.size(); start += batch_size) {
    if (max_batches > 0 && done >= max_batches) break;
    idx.resize(std::min(batch_size, dataset.size() - start));
    std::iota(idx.begin(), idx.end(), start);
    fn(make_batch(dataset, idx));
    ++done;
  }
  return done;
}

// ---------------------------------------------------------------------------------------------
// Loader

Json LoaderState::to_json() const {
  return Json{{"epoch", epoch},
              {"index", index},
              {"seed", seed},
              {"num_examples", num_examples},
              {"batch_size", batch_size}};
}

LoaderState LoaderState::from_json(const Json& j) {
  QTUNE_CHECK(j.is_object(), "data loader state must be an object, got ", j.dump());
  auto unsigned_field = [&](const char* key) -> uint64_t {
    QTUNE_CHECK(j.contains(key), "data loader state: missing field '", key, "'");
    QTUNE_CHECK(
        j[key].is_number_unsigned() || (j[key].is_number_integer() && j[key].get<int64_t>() >= 0),
        "data loader state: field '", key, "' must be a non-negative integer, got ", j[key].dump());
    return j[key].get<uint64_t>();
  };
  LoaderState s;
  s.epoch = unsigned_field("epoch");
  s.index = static_cast<int64_t>(unsigned_field("index"));
  s.seed = unsigned_field("seed");
  s.num_examples = static_cast<int64_t>(unsigned_field("num_examples"));
  s.batch_size = static_cast<int64_t>(unsigned_field("batch_size"));
  return s;
}

DataLoader::DataLoader(std::shared_ptr<const TokenDataset> dataset, int64_t batch_size,
                       uint64_t seed, bool shuffle, bool drop_last)
    : dataset_(std::move(dataset)),
      batch_size_(batch_size),
      seed_(seed),
      shuffle_(shuffle),
      drop_last_(drop_last) {
  QTUNE_CHECK(dataset_ != nullptr, "data loader: no dataset");
  QTUNE_CHECK(batch_size_ >= 1, "batch_size must be >= 1, got ", batch_size_);
  const int64_t n = dataset_->size();
  batches_per_epoch_ = drop_last_ ? n / batch_size_ : (n + batch_size_ - 1) / batch_size_;
  QTUNE_CHECK(batches_per_epoch_ > 0, "'", dataset_->stats().source, "' gives ", n, " examples of ",
              dataset_->seq_len(), " tokens, fewer than batch_size ", batch_size_,
              "; lower the batch size or data.seq_len, or add data");
}

void DataLoader::ensure_order() {
  if (order_epoch_ == static_cast<int64_t>(epoch_)) return;
  order_ = shuffle_ ? seeded_permutation(dataset_->size(), seed_ + epoch_)
                    : all_indices(dataset_->size());
  order_epoch_ = static_cast<int64_t>(epoch_);
}

Batch DataLoader::next() {
  ensure_order();
  const int64_t start = index_ * batch_size_;
  const int64_t count = std::min(batch_size_, dataset_->size() - start);
  std::vector<int64_t> idx(order_.begin() + start, order_.begin() + start + count);
  Batch batch = make_batch(*dataset_, idx);
  if (++index_ >= batches_per_epoch_) {
    ++epoch_;
    index_ = 0;
  }
  return batch;
}

LoaderState DataLoader::state() const {
  LoaderState s;
  s.epoch = epoch_;
  s.index = index_;
  s.seed = seed_;
  s.num_examples = dataset_->size();
  s.batch_size = batch_size_;
  return s;
}

void DataLoader::restore(const LoaderState& s) {
  QTUNE_CHECK(s.num_examples == dataset_->size() && s.batch_size == batch_size_ && s.seed == seed_,
              "cannot resume the data position: it was saved for ", s.num_examples,
              " examples, batch_size ", s.batch_size, ", seed ", s.seed, "; now ", dataset_->size(),
              " examples, batch_size ", batch_size_, ", seed ", seed_,
              " (the data, data.seq_len, batch size or seed changed)");
  QTUNE_CHECK(s.index >= 0 && s.index < batches_per_epoch_,
              "cannot resume the data position: ", "batch index ", s.index, " is outside [0, ",
              batches_per_epoch_, ")");
  epoch_ = s.epoch;
  index_ = s.index;
}

}  // namespace qtune
