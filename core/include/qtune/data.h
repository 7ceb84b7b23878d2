// Training data: plain text packed into fixed blocks; Alpaca instruction records and chat
// conversations (OpenAI/HF "messages", ShareGPT "conversations") rendered with a chat template,
// the loss on the assistant's tokens only; optional packing of several examples per sequence
// with a block-diagonal mask; a document-level train/validation split; and a loader with
// deterministic per-epoch shuffling whose position is small, exact and serialisable for resume.
//
// Every user error (missing file, bad JSON, missing key, a split with no example) is a UserError
// naming the file, the record or line and the key.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "qtune/export.h"
#include "qtune/options.h"

namespace qtune {

class Tokenizer;

/// Target value of a position that does not count in the loss (prompt, padding); the default
/// ignore_index of torch's cross_entropy.
constexpr int64_t kIgnoreIndex = -100;

/// What to read and how to cut it. Field names match the recipe's `data.*` keys, which errors name.
struct DataConfig {
  /// Training file: plain text, or a JSON array / JSONL file of records.
  std::string path;
  /// "text", "alpaca", "messages", "sharegpt", or "auto": .txt/.text/.md (or content not
  /// starting with '[' or '{') is text; JSON is classified by its first record's keys
  /// ("messages" -> messages, "conversations" -> sharegpt, "instruction" + "output" -> alpaca;
  /// data.messages_field counts as a chat key) and the choice is logged.
  std::string format = "auto";
  /// Optional validation file (its format resolved the same way). Exclusive with val_fraction.
  std::string val_path;
  /// Fraction in [0, 1) of the training file's documents (text) or records (alpaca) held out for
  /// validation when val_path is empty; 0 = no validation set.
  double val_fraction = 0.0;
  /// Tokens per example T (model inputs); each example holds T inputs and T targets.
  int64_t seq_len = 512;
  /// Decides the held-out documents. The loader takes its own seed (see DataLoader).
  uint64_t seed = 0;

  /// Chat formats: a built-in template name (ChatTemplate::builtin_names()), or "auto" = the
  /// model's own (model_chat_template). Alpaca records use the Stanford prompt with "auto" and
  /// become one user/assistant exchange in the named template otherwise.
  std::string chat_template = "auto";
  /// The model's tokenizer_config.json chat_template ("" = it has none) and where it came from.
  std::string model_chat_template;
  std::string model_chat_template_origin;
  /// Key of the message list ("" = "messages", or "conversations" for sharegpt), and of each
  /// message's role and text ("" = "role"/"content", or "from"/"value" for sharegpt).
  std::string messages_field;
  std::string role_field;
  std::string content_field;
  /// The data set's names for each role ([] = the format's: messages {system, user, assistant};
  /// sharegpt {system}, {human, user}, {gpt, assistant}).
  std::vector<std::string> role_system, role_user, role_assistant;
  /// false: the loss counts the assistant's tokens only (content and end of turn); true: every
  /// token but padding.
  bool train_on_prompt = false;
  /// A record longer than seq_len + 1 tokens: "truncate" (keep the first seq_len + 1; dropped
  /// when no target is left) or "drop". Both are counted and logged.
  std::string overlong = "truncate";
  /// Records formats: several examples per sequence, each attending only to itself, positions
  /// restarting at 0 (Batch::positions / Batch::segments).
  bool pack = false;
};

/// One training example: T input ids and T target ids (kIgnoreIndex = not in the loss).
struct Example {
  std::vector<int64_t> tokens;
  std::vector<int64_t> targets;
};

/// A batch of B examples.
struct Batch {
  torch::Tensor tokens;     ///< [B, T] int64 input ids, CPU
  torch::Tensor targets;    ///< [B, T] int64 next-token ids, kIgnoreIndex where ignored, CPU
  /// Packed datasets only (undefined otherwise): [B, T] int64 position of each token inside its
  /// own example (0, 1, ... restarting per example), and [B, T] int64 segment ids (1, 2, ... per
  /// example of the row, 0 for padding); a token attends only to earlier tokens of its segment.
  torch::Tensor positions;
  torch::Tensor segments;
  int64_t num_targets = 0;  ///< count of targets != kIgnoreIndex (for loss normalisation)
};

/// Counts describing one split, for logs and the run summary.
struct DatasetStats {
  std::string source;             ///< file the split came from
  std::string format;             ///< "text", "alpaca", "messages" or "sharegpt"
  std::string chat_template;      ///< template the records were rendered with ("" = none)
  int64_t documents = 0;          ///< text documents (blank-line separated) or records
  int64_t tokens = 0;             ///< tokens after tokenisation (BOS/EOS included, before packing)
  int64_t examples = 0;           ///< size() of the dataset
  int64_t target_tokens = 0;      ///< targets that count in the loss, over all examples
  int64_t dropped_tokens = 0;     ///< text: the tail shorter than a block; records: cut tokens
  int64_t truncated_records = 0;  ///< records cut to seq_len + 1 tokens (data.overlong truncate)
  int64_t dropped_records = 0;    ///< records left out: too long (drop) or no target left
  int64_t packed_records = 0;     ///< data.pack: records placed in the examples
  int64_t padding_tokens = 0;     ///< input positions holding no example token, over all examples
};

/// Fixed-length examples, read-only after construction, indexable in O(1).
class QTUNE_API TokenDataset {
 public:
  virtual ~TokenDataset();
  /// Number of examples.
  virtual int64_t size() const = 0;
  /// Tokens per example T.
  virtual int64_t seq_len() const = 0;
  /// Example i, 0 <= i < size(); throws std::out_of_range otherwise.
  virtual Example get(int64_t i) const = 0;
  /// Writes example i into tokens[0..T) and targets[0..T) (no allocation; used by batching).
  /// Returns the number of targets that count in the loss.
  virtual int64_t fill(int64_t i, int64_t* tokens, int64_t* targets) const = 0;
  virtual const DatasetStats& stats() const = 0;
  /// Whether examples hold several segments (data.pack); then fill_segments gives their layout.
  virtual bool packed() const { return false; }
  /// Writes example i's positions[0..T) and segments[0..T) (see Batch). Only for packed().
  virtual void fill_segments(int64_t i, int64_t* positions, int64_t* segments) const;
};

/// The splits load_data produced. `val` is null when no validation was asked for.
struct DataSplits {
  std::shared_ptr<TokenDataset> train;
  std::shared_ptr<TokenDataset> val;
};

/// Plain text: documents are separated by one or more blank (whitespace-only) lines; each is
/// tokenised with BOS and EOS, the documents are concatenated and cut into blocks of T+1 tokens,
/// consecutive blocks sharing one token (block k = stream[kT, kT+T+1)), so every token but the
/// first is a target exactly once; the tail shorter than a block is dropped. Packed, each
/// document is its own segment instead, cut into pieces of at most T+1 ids sharing one id.
///
/// Alpaca: records {"instruction", "input" (optional, may be ""), "output"} (other keys ignored)
/// are formatted with the Stanford Alpaca prompt (tatsu-lab/stanford_alpaca train.py
/// PROMPT_DICT, exact text, ending in "### Response:"); ids = BOS + encode(prompt) +
/// encode(output) + EOS, where the prompt and the response are tokenised separately so the
/// boundary is exact (the tokenizer's dummy-prefix space separates "Response:" from the answer).
/// With a named chat_template each record is instead the exchange {user: instruction (+ "\n\n"
/// + input), assistant: output} rendered by that template.
///
/// Messages / ShareGPT: each record's conversation (see DataConfig for keys and role names) is
/// rendered by the chat template (ChatTemplate::encode, no generation prompt); the targets that
/// count are the assistant's tokens (every answer and its end of turn), or all with
/// train_on_prompt.
///
/// Records: a record of more than T+1 ids is cut to T+1 or dropped (DataConfig::overlong); a
/// record left without a counted target is dropped (both counted in stats and logged). Unpacked,
/// inputs = ids[:-1] padded to T with EOS, targets = ids[1:] with kIgnoreIndex where not counted
/// and on the padding. Packed (DataConfig::pack), see PackedRecordDataset in data.cpp: records
/// follow each other in each example, each with positions from 0 and its own segment id.
/// Malformed records are all reported (logged; the UserError names the first and the count).
///
/// Split: with val_fraction, document (or record) order is shuffled with `seed` and the first
/// round(fraction * n) are held out, so train and val never share a document; both keep file
/// order inside. Throws UserError for a bad config value (naming data.<key>), an unreadable file,
/// malformed records, or a split without a single example.
/// Records are named `<file> record [i]` (0-based index in a JSON array) or `<file> line n`
/// (1-based line of a JSONL file), with the key at fault.
QTUNE_API DataSplits load_data(const DataConfig& config, const Tokenizer& tokenizer);

/// The Alpaca prompt for one record (exposed for generation tools and tests).
QTUNE_API std::string alpaca_prompt(const std::string& instruction, const std::string& input);

/// A loader's position: the next batch is batch `index` of epoch `epoch`. The other fields are
/// what the position is only valid for; restore() checks them.
struct QTUNE_API LoaderState {
  uint64_t epoch = 0;
  int64_t index = 0;
  uint64_t seed = 0;
  int64_t num_examples = 0;
  int64_t batch_size = 0;

  Json to_json() const;
  /// Throws UserError naming the missing or mistyped field.
  static LoaderState from_json(const Json& j);
};

/// Endless batches over a dataset. With shuffle, epoch e visits the examples in a permutation
/// drawn from a generator seeded with seed + e (Fisher-Yates over mt19937_64, so the order is
/// the same on every platform and standard library); without, in index order.
class QTUNE_API DataLoader {
 public:
  /// drop_last: an epoch has floor(size / batch_size) full batches (fixed shapes for training);
  /// otherwise the last batch of an epoch may be smaller. Throws UserError when batch_size < 1 or
  /// the dataset cannot fill a single batch.
  DataLoader(std::shared_ptr<const TokenDataset> dataset, int64_t batch_size, uint64_t seed,
             bool shuffle = true, bool drop_last = true);

  /// The batch at the current position; then advances (to the next epoch after the last batch).
  Batch next();
  /// The position of the batch next() returns.
  LoaderState state() const;
  /// Continues exactly where `state` was taken; throws UserError when it was taken for another
  /// seed, dataset size or batch size.
  void restore(const LoaderState& state);

  int64_t batches_per_epoch() const { return batches_per_epoch_; }
  int64_t batch_size() const { return batch_size_; }
  uint64_t epoch() const { return epoch_; }
  const TokenDataset& dataset() const { return *dataset_; }

 private:
  void ensure_order();

  std::shared_ptr<const TokenDataset> dataset_;
  int64_t batch_size_;
  uint64_t seed_;
  bool shuffle_;
  bool drop_last_;
  int64_t batches_per_epoch_;
  uint64_t epoch_ = 0;
  int64_t index_ = 0;
  std::vector<int64_t> order_;  // example indices of order_epoch_
  int64_t order_epoch_ = -1;    // epoch order_ was drawn for, -1 = none yet
};

/// Calls fn on the batches of `dataset` in index order (the last may be smaller), stopping after
/// max_batches when max_batches > 0. Returns the number of batches visited.
QTUNE_API int64_t for_each_eval_batch(const TokenDataset& dataset, int64_t batch_size,
                                      int64_t max_batches,
                                      const std::function<void(const Batch&)>& fn);

/// Stacks examples `indices` of `dataset` into one batch.
QTUNE_API Batch make_batch(const TokenDataset& dataset, const std::vector<int64_t>& indices);

/// The permutation of 0..n-1 drawn from mt19937_64(seed) by Fisher-Yates with unbiased bounded
/// draws; identical on every platform.
QTUNE_API std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed);

}  // namespace qtune
