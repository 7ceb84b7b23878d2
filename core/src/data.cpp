// The data pipeline: reading text / Alpaca files, tokenising, packing or prompt masking, the
// document-level validation split, and the deterministic, resumable batch loader.
#include "qtune/data.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>

#include "qtune/error.h"
#include "qtune/options.h"
#include "qtune/tokenizer.h"

namespace fs = std::filesystem;

namespace qtune {

TokenDataset::~TokenDataset() = default;

namespace {

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

bool is_blank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c); });
}

std::string lower_extension(const std::string& path) {
  std::string ext = fs::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext;
}

char first_non_blank(const std::string& text) {
  for (unsigned char c : text)
    if (!std::isspace(c)) return static_cast<char>(c);
  return '\0';
}

std::string resolve_format(const std::string& format, const std::string& path,
                           const std::string& text) {
  if (format != "auto") return format;
  const std::string ext = lower_extension(path);
  if (ext == ".json" || ext == ".jsonl") return "alpaca";
  if (ext == ".txt" || ext == ".text" || ext == ".md") return "text";
  const char c = first_non_blank(text);
  return (c == '[' || c == '{') ? "alpaca" : "text";
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

int64_t line_of_byte(const std::string& text, size_t byte) {
  byte = std::min(byte, text.size());
  return 1 + std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(byte), '\n');
}

std::vector<AlpacaRecord> read_alpaca(const std::string& path, const std::string& text) {
  std::vector<AlpacaRecord> records;
  const char c = first_non_blank(text);
  if (c == '[') {
    Json all;
    try {
      all = Json::parse(text);
    } catch (const Json::parse_error& e) {
      throw UserError(detail::concat(path, " line ", line_of_byte(text, e.byte), ": invalid JSON (",
                                     e.what(), ")"));
    }
    for (size_t i = 0; i < all.size(); ++i)
      records.push_back(parse_record(all[i], detail::concat(path, " record [", i, "]")));
  } else if (c == '{') {
    // JSON lines: one object per line, blank lines allowed.
    size_t start = 0;
    int64_t line_no = 0;
    while (start < text.size()) {
      size_t end = text.find('\n', start);
      if (end == std::string::npos) end = text.size();
      ++line_no;
      const std::string line = text.substr(start, end - start);
      start = end + 1;
      if (is_blank(line)) continue;
      const std::string where = detail::concat(path, " line ", line_no);
      Json j;
      try {
        j = Json::parse(line);
      } catch (const Json::parse_error& e) {
        throw UserError(detail::concat(where, ": invalid JSON (", e.what(),
                                       "); expected one object per line (JSONL) or a JSON array"));
      }
      records.push_back(parse_record(j, where));
    }
  } else {
    throw UserError(detail::concat(
        path,
        ": not Alpaca data: expected a JSON array of {\"instruction\", \"input\", "
        "\"output\"} objects or one such object per line (JSONL); set data.format: text "
        "for plain text"));
  }
  QTUNE_CHECK(!records.empty(), path, ": no records");
  return records;
}

class AlpacaDataset : public TokenDataset {
 public:
  struct Item {
    std::vector<int32_t> ids;  // BOS + prompt + response + EOS, truncated to T+1
    int64_t prompt_len;        // ids that belong to BOS + prompt
  };
  AlpacaDataset(std::vector<Item> items, int64_t seq_len, int32_t pad_id, DatasetStats stats)
      : items_(std::move(items)), seq_len_(seq_len), pad_id_(pad_id), stats_(std::move(stats)) {
    stats_.examples = static_cast<int64_t>(items_.size());
    for (const auto& it : items_)
      stats_.target_tokens += static_cast<int64_t>(it.ids.size()) - it.prompt_len;
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
    if (i < 0 || i >= size())
      throw std::out_of_range(detail::concat("example ", i, " out of range [0, ", size(), ")"));
    const Item& it = items_[i];
    const int64_t n = static_cast<int64_t>(it.ids.size());
    int64_t counted = 0;
    for (int64_t j = 0; j < seq_len_; ++j) {
      tokens[j] = j < n ? it.ids[j] : pad_id_;
      // Position j predicts ids[j+1]; only response tokens (index >= prompt_len) count.
      const bool counts = j + 1 < n && j + 1 >= it.prompt_len;
      targets[j] = counts ? it.ids[j + 1] : kIgnoreIndex;
      counted += counts;
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

std::shared_ptr<TokenDataset> make_alpaca_split(const std::vector<AlpacaRecord>& records,
                                                const std::vector<int64_t>& which,
                                                const Tokenizer& tokenizer, int64_t seq_len,
                                                const std::string& source,
                                                const std::string& what) {
  DatasetStats stats;
  stats.source = source;
  stats.format = "alpaca";
  stats.documents = static_cast<int64_t>(which.size());
  std::vector<AlpacaDataset::Item> items;
  items.reserve(which.size());
  int64_t first_dropped = -1;
  for (int64_t r : which) {
    const AlpacaRecord& rec = records[r];
    AlpacaDataset::Item item;
    const std::vector<int> prompt =
        tokenizer.encode(alpaca_prompt(rec.instruction, rec.input), /*bos=*/true, /*eos=*/false);
    const std::vector<int> response = tokenizer.encode(rec.output, /*bos=*/false, /*eos=*/true);
    item.ids.assign(prompt.begin(), prompt.end());
    item.ids.insert(item.ids.end(), response.begin(), response.end());
    item.prompt_len = static_cast<int64_t>(prompt.size());
    stats.tokens += static_cast<int64_t>(item.ids.size());
    const int64_t keep = std::min<int64_t>(static_cast<int64_t>(item.ids.size()), seq_len + 1);
    stats.dropped_tokens += static_cast<int64_t>(item.ids.size()) - keep;
    item.ids.resize(keep);
    if (item.prompt_len >= keep) {
      // Nothing of the response survives truncation: no loss term, only wasted compute.
      ++stats.dropped_records;
      if (first_dropped < 0) first_dropped = r;
      continue;
    }
    items.push_back(std::move(item));
  }
  if (stats.dropped_records > 0)
    spdlog::warn("{}: {} of {} records dropped ({} first): the prompt fills data.seq_len = {}",
                 source, stats.dropped_records, which.size(),
                 detail::concat("record [", first_dropped, "]"), seq_len);
  const int eos = tokenizer.eos_id();
  auto ds = std::make_shared<AlpacaDataset>(std::move(items), seq_len, eos >= 0 ? eos : 0,
                                            std::move(stats));
  QTUNE_CHECK(ds->size() > 0, what, " from '", source, "' has no usable record (",
              ds->stats().documents, " records, ", ds->stats().dropped_records,
              " with prompts longer than data.seq_len = ", seq_len, ")");
  return ds;
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
  spdlog::info("data {}: {} ({}): {} {}, {} tokens -> {} examples of {} tokens, {} targets", name,
               s.source, s.format, s.documents, s.format == "text" ? "documents" : "records",
               s.tokens, s.examples, ds.seq_len(), s.target_tokens);
}

void check_config(const DataConfig& c) {
  QTUNE_CHECK(!c.path.empty(), "data.path is required (a text, Alpaca JSON or JSONL file)");
  QTUNE_CHECK(c.format == "auto" || c.format == "text" || c.format == "alpaca",
              "data.format must be text, alpaca or auto, got '", c.format, "'");
  QTUNE_CHECK(c.seq_len >= 1, "data.seq_len must be >= 1, got ", c.seq_len);
  QTUNE_CHECK(c.val_fraction >= 0 && c.val_fraction < 1,
              "data.val_fraction must be in [0, 1), got ", c.val_fraction);
  QTUNE_CHECK(c.val_path.empty() || c.val_fraction == 0,
              "data.val_path and data.val_fraction are exclusive (got val_path '", c.val_path,
              "' and val_fraction ", c.val_fraction, ")");
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
  const std::string text = read_text_file(config.path, "data.path");
  const std::string format = resolve_format(config.format, config.path, text);
  std::string val_text, val_format;
  if (!config.val_path.empty()) {
    val_text = read_text_file(config.val_path, "data.val_path");
    val_format = resolve_format(config.format, config.val_path, val_text);
  }

  if (format == "text") {
    const auto docs = split_documents(text);
    QTUNE_CHECK(!docs.empty(), "data.path: '", config.path, "' holds no text");
    std::vector<int64_t> train_idx = all_indices(static_cast<int64_t>(docs.size()));
    if (config.val_fraction > 0) {
      auto [train, val] = split_indices(static_cast<int64_t>(docs.size()), config.val_fraction,
                                        config.seed, config.path, "documents");
      train_idx = std::move(train);
      out.val = make_text_split(docs, val, tokenizer, config.seq_len, config.path,
                                "the validation split");
    }
    out.train = make_text_split(docs, train_idx, tokenizer, config.seq_len, config.path,
                                "the training split");
  } else {
    const auto records = read_alpaca(config.path, text);
    std::vector<int64_t> train_idx = all_indices(static_cast<int64_t>(records.size()));
    if (config.val_fraction > 0) {
      auto [train, val] = split_indices(static_cast<int64_t>(records.size()), config.val_fraction,
                                        config.seed, config.path, "records");
      train_idx = std::move(train);
      out.val = make_alpaca_split(records, val, tokenizer, config.seq_len, config.path,
                                  "the validation split");
    }
    out.train = make_alpaca_split(records, train_idx, tokenizer, config.seq_len, config.path,
                                  "the training split");
  }

  if (!config.val_path.empty()) {
    if (val_format == "text") {
      const auto docs = split_documents(val_text);
      QTUNE_CHECK(!docs.empty(), "data.val_path: '", config.val_path, "' holds no text");
      out.val = make_text_split(docs, all_indices(static_cast<int64_t>(docs.size())), tokenizer,
                                config.seq_len, config.val_path, "the validation file");
    } else {
      const auto records = read_alpaca(config.val_path, val_text);
      out.val =
          make_alpaca_split(records, all_indices(static_cast<int64_t>(records.size())), tokenizer,
                            config.seq_len, config.val_path, "the validation file");
    }
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
