// Training data: plain text packed into fixed blocks, or Alpaca-style instruction records with the
// loss on the response only; a document-level train/validation split; and a loader with
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
  /// Training file: plain text, an Alpaca JSON array, or Alpaca JSONL (one object per line).
  std::string path;
  /// "text", "alpaca", or "auto": by extension (.json/.jsonl -> alpaca, .txt -> text), otherwise
  /// alpaca when the first non-blank byte is '[' or '{', text else.
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
  int64_t num_targets = 0;  ///< count of targets != kIgnoreIndex (for loss normalisation)
};

/// Counts describing one split, for logs and the run summary.
struct DatasetStats {
  std::string source;           ///< file the split came from
  std::string format;           ///< "text" or "alpaca"
  int64_t documents = 0;        ///< text documents (blank-line separated) or records in the split
  int64_t tokens = 0;           ///< tokens after tokenisation (BOS/EOS included, before packing)
  int64_t examples = 0;         ///< size() of the dataset
  int64_t target_tokens = 0;    ///< targets that count in the loss, over all examples
  int64_t dropped_tokens = 0;   ///< text: the tail shorter than a block; alpaca: truncated tokens
  int64_t dropped_records = 0;  ///< alpaca: records whose response was truncated away entirely
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
};

/// The splits load_data produced. `val` is null when no validation was asked for.
struct DataSplits {
  std::shared_ptr<TokenDataset> train;
  std::shared_ptr<TokenDataset> val;
};

/// Plain text: documents are separated by one or more blank (whitespace-only) lines; each is
/// tokenised with BOS and EOS, the documents are concatenated and cut into blocks of T+1 tokens,
/// consecutive blocks sharing one token (block k = stream[kT, kT+T+1)), so every token but the
/// first is a target exactly once; the tail shorter than a block is dropped.
///
/// Alpaca: records {"instruction", "input" (optional, may be ""), "output"} (other keys ignored)
/// are formatted with the Stanford Alpaca prompt (tatsu-lab/stanford_alpaca train.py
/// PROMPT_DICT, exact text, ending in "### Response:"); ids = BOS + encode(prompt) +
/// encode(output) + EOS, where the prompt and the response are tokenised separately so the
/// boundary is exact (the tokenizer's dummy-prefix space separates "Response:" from the answer).
/// Truncated to T+1 ids, inputs = ids[:-1], targets = ids[1:] with every target that is a prompt
/// token set to kIgnoreIndex; right-padded to T with input EOS and target kIgnoreIndex. A record
/// whose response is cut away entirely is dropped (counted in stats and logged).
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
