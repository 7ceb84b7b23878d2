// qtune-bench's measuring logic: quantization backends compared on memory, error and speed
// (quant), the perplexity of a quantized model (ppl), the same short fine-tune for full, LoRA and
// QLoRA with every backend (finetune), and LoRA vs QLoRA memory and step time on synthetic models
// of growing size (scale). Backends come from the registry, so a new plugin shows up unchanged.
//
// Every sub-command returns tables (written as CSV and markdown) and gnuplot plots. Timings are
// medians of several repeats after warm-up, and every comparison is a ratio of two timings taken
// in the same run. Fine-tune and scale configurations each run in a fresh child process (the
// running executable with a hidden sub-command), so the peak RSS reported is that configuration's.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "qtune/export.h"
#include "qtune/model_config.h"
#include "qtune/options.h"
#include "qtune/registry.h"

namespace qtune {

// ---------------------------------------------------------------------------------------------
// Result tables

/// One column of a BenchTable.
struct BenchColumn {
  std::string name;      ///< CSV header and markdown header
  int precision = 4;     ///< markdown: significant digits of a number (the CSV keeps 6)
  bool markdown = true;  ///< shown in the markdown table (the CSV has every column)
};

/// A table of results: rows of JSON scalars (number, string, bool or null = empty cell) under
/// fixed columns. Written as CSV (RFC 4180 quoting; columns whose values may hold commas are put
/// last by the producers, so gnuplot's comma separator reads the others) and as markdown.
class BenchTable {
 public:
  BenchTable() = default;
  /// `name` is the file stem ("quant" -> quant.csv, quant.md); `title` heads the markdown.
  BenchTable(std::string name, std::string title, std::vector<BenchColumn> columns);

  /// Appends a row from {column: value}; absent columns stay empty. A key that is not a column
  /// is a programming error (std::logic_error).
  void add(const Json& row);

  const std::string& name() const { return name_; }
  const std::string& title() const { return title_; }
  const std::vector<BenchColumn>& columns() const { return columns_; }
  const std::vector<std::vector<Json>>& rows() const { return rows_; }
  /// Index of `column` (std::logic_error when absent).
  size_t index(const std::string& column) const;
  /// The value of `column` in row `row`.
  const Json& at(size_t row, const std::string& column) const;

  std::string csv() const;
  /// Title, the table, then `notes` as paragraphs.
  std::string markdown() const;

  /// Markdown lines shown under the table (what was measured and how).
  std::vector<std::string> notes;
  /// Written as CSV only (long series such as loss curves); the markdown links to it.
  bool csv_only = false;

 private:
  std::string name_, title_;
  std::vector<BenchColumn> columns_;
  std::vector<std::vector<Json>> rows_;
};

/// A gnuplot script (referring to CSV files by name, relative to the output folder) and the PNG
/// it draws.
struct BenchPlot {
  std::string name;    ///< file stem: <name>.gp, <name>.png
  std::string title;   ///< alt text in the markdown
  std::string script;  ///< complete gnuplot script, run in the output folder
};

/// What one sub-command produced.
struct BenchResult {
  std::string command;  ///< "quant", "ppl", "finetune", "scale"
  std::vector<BenchTable> tables;
  std::vector<BenchPlot> plots;
  double seconds = 0;  ///< wall time of the sub-command
};

// ---------------------------------------------------------------------------------------------
// Options

/// One quantization backend with one option set.
struct QuantSet {
  std::string backend;
  Json options = Json::object();  ///< as given (unresolved); the backend's schema fills defaults
  /// Option keys in the order the user wrote them (labels follow it; Json objects are sorted).
  std::vector<std::string> key_order;

  /// "nf4", "hqq nbits=2 group_size=16": the backend and the options given.
  std::string label() const;
  /// The same with each snake_case key shortened to its initials, for plots:
  /// "hqq nbits=2 gs=16", "nf4 dq=false".
  std::string short_label() const;
};

/// Parses "name:{json};name:{json};..." (a set without ":{...}" means the defaults). Throws
/// UserError naming `flag`, the entry and what was expected. Backends are not looked up here.
std::vector<QuantSet> parse_quant_sets(const std::string& text, const std::string& flag);

/// The option sets to run: `wanted` whose backends the registry has (others are dropped with a
/// warning when `from_defaults`, a UserError naming `flag` otherwise), then, when `from_defaults`,
/// the default set of every quant plugin found that `wanted` does not mention, so a new plugin is
/// benchmarked with no change to the tool.
std::vector<QuantSet> select_quant_sets(const std::vector<QuantSet>& wanted,
                                                  const Registry& registry, bool from_defaults,
                                                  const std::string& flag);

/// A synthetic Llama configuration for `scale`: "tiny" (~0.1M, tests), "15M" (llama2.c
/// stories15M), "60M", "250M", "1B" (TinyLlama-1.1B's shape, GQA 32/4), "7B" (Llama-2-7B's
/// shape: 32 layers, hidden 4096, intermediate 11008, 32 heads, untied head); "<name>:<layers>"
/// keeps the shapes with fewer decoder layers ("7B:2"). Throws UserError naming `flag` and
/// listing the names otherwise.
ModelConfig synthetic_config(const std::string& size, const std::string& flag);

/// Everything the sub-commands need. Paths of shared data resolve like recipe paths
/// (resolve_data_path: absolute, relative to the working directory, $QTUNE_DATA, ../shared/data).
struct BenchOptions {
  std::string out_dir = "bench-out";
  torch::Device device = torch::kCPU;
  int threads = 0;  ///< intra-op threads; 0 = every core
  int repeats = 5;  ///< timed repeats per measurement (the median is reported)
  int warmup = 1;   ///< untimed runs before them
  std::string plugin_dir;
  std::string self_exe;    ///< this executable, for the child processes (fork + exec)
  std::string work_dir;    ///< fine-tune / scale run folders; empty = a fresh temp folder
  bool keep_runs = false;  ///< keep work_dir afterwards
  std::vector<std::string> command_line;  ///< argv, recorded in the report

  /// Quantization option sets (quant, ppl, finetune). scale_sets: one per backend when empty.
  std::vector<QuantSet> quant_sets;
  std::vector<QuantSet> scale_sets;

  // quant
  /// "model" (every 2-D weight of model_path, aggregated), "gaussian:OUTxIN",
  /// "student_t:OUTxIN" (Student-t with 3 degrees of freedom), scaled to std 0.02.
  std::vector<std::string> matrices;
  int64_t linear_tokens = 128;  ///< rows of x in the linear forward + backward timing
  uint64_t seed = 0;

  // ppl and finetune
  std::string model_path = "stories260K.bin";
  std::string tokenizer_path = "tok512.bin";
  std::string ppl_text = "tinystories_val_head.txt";
  int64_t ppl_seq_len = 0;     ///< 0 = the model's max_position_embeddings
  int64_t ppl_max_blocks = 0;  ///< 0 = the whole text
  /// "stream": the text as one token stream in windows of ppl_seq_len + 1 tokens, every token
  /// scored. "llama": llama.cpp's llama-perplexity: chunks of ppl_seq_len tokens, each starting
  /// with BOS (when the tokenizer adds one), only the second half of each chunk scored.
  std::string ppl_scoring = "stream";
  /// Module patterns kept dense in the quantized runs (quant.skip_modules' syntax), e.g. the
  /// modules llama.cpp keeps at higher precision.
  std::vector<std::string> ppl_skip_modules;
  std::string finetune_data = "tinyshakespeare.txt";
  int64_t finetune_steps = 100;
  int64_t finetune_batch = 8;
  int64_t finetune_seq_len = 128;
  double finetune_lr = 3e-3;       ///< LoRA / QLoRA
  double finetune_full_lr = 1e-3;  ///< full fine-tune (a smaller rate, as usual for full tuning)
  std::string finetune_dtype = "fp32";
  int64_t finetune_eval_every = 20;
  bool finetune_pack = false;  ///< data.pack in every run (records data: several per sequence)
  /// Ranks each configuration runs on (data parallel, same global batch); {1} = one process.
  std::vector<int64_t> finetune_ranks = {1};
  /// A synthetic size (synthetic_config) to fine-tune instead of model_path; "" = model_path.
  std::string finetune_size;
  /// Threads of each fine-tune (0 = `threads`). One by default: at stories260K's size a step is
  /// hundreds of tiny ops, and a second thread made it slower and bimodal on a shared VM.
  int finetune_threads = 1;
  /// Adapter plugin for lora / qlora; empty = lora when registered, else the first adapter found.
  std::string adapter;
  Json adapter_options = Json::object();  ///< unresolved; the adapter's schema fills defaults

  // scale
  std::vector<std::string> scale_sizes = {"15M", "60M", "250M", "1B"};
  std::vector<std::string> scale_dtypes = {"bf16"};
  int64_t scale_steps = 4;  ///< timed steps (after `warmup` untimed ones)
  int64_t scale_batch = 1;
  int64_t scale_seq_len = 512;
  bool scale_checkpointing = false;  ///< activation checkpointing in the timed steps
  /// scale: ranks per configuration (data parallel over c10d Gloo, started as torchrun would,
  /// each with scale_batch sequences and threads / ranks threads), and whether a qlora base is
  /// sharded over them (dist.shard_base), and AdamW's moments (dist.shard_optimizer).
  int64_t scale_ranks = 1;
  bool scale_shard_base = false, scale_shard_optimizer = false;
};

// ---------------------------------------------------------------------------------------------
// Sub-commands

/// Checks everything `command` ("quant", "ppl", "finetune", "scale" or "all") will use before
/// anything runs: matrix specs, sizes, dtypes, counts, data paths, the adapter plugin and its
/// options. Throws UserError naming the flag, the value and what was expected.
void validate_bench_options(const BenchOptions& options, const Registry& registry,
                                      const std::string& command);

/// Every (option set, matrix): bits/parameter from nbytes(), relative Frobenius error, NMSE,
/// max |error|, quantize time, dequantize throughput (GB/s written, and its ratio to a memcpy of
/// the same bytes), linear forward + input-gradient time as a ratio to dense fp32 / bf16 matmuls.
/// A set a backend rejects becomes a row with its status.
BenchResult bench_quant(const BenchOptions& options, const Registry& registry);
/// Perplexity of model_path on ppl_text, unquantized and with every linear quantized by each set.
BenchResult bench_ppl(const BenchOptions& options, const Registry& registry);
/// The same short fine-tune (data, seed, steps, batch) for full, lora and qlora with each set.
BenchResult bench_finetune(const BenchOptions& options, const Registry& registry);
/// LoRA vs QLoRA (one set per backend) on synthetic configs: peak RSS, base bytes, step time.
BenchResult bench_scale(const BenchOptions& options, const Registry& registry);

/// The hidden sub-commands the child processes run: "__finetune RECIPE.json" (a Trainer run;
/// writes summary.json and metrics.jsonl), "__finetune_ranks N RECIPE.json" (the same run on N
/// local ranks, started as torchrun would), "__synthesize SPEC.json" (writes a random-weight HF
/// checkpoint for scale) and "__scale SPEC.json RESULT.json". Returns the exit code.
int bench_child_main(const std::vector<std::string>& args, const Registry& registry);
/// True for the hidden sub-command names.
bool is_bench_child_command(const std::string& command);

// ---------------------------------------------------------------------------------------------
// Output

/// The machine and run: cpu, cores, memory, LibTorch version, threads, device, date (UTC),
/// command.
Json bench_machine_info(const BenchOptions& options);
/// The machine's memory (MemTotal of /proc/meminfo) in bytes; 0 when unreadable.
double machine_memory_bytes();

/// Writes <out>/<table>.csv and .md for every table, <out>/<plot>.gp, and runs gnuplot on each
/// (PNG next to it). Returns the markdown section for this result (tables, images, notes).
/// When gnuplot is missing the plots are skipped and the section says so.
std::string write_bench_result(const BenchResult& result, const BenchOptions& options);

/// Writes <out>/report.md: machine, date and command of this run, then every sub-command section
/// found in <out> (quant, ppl, finetune, scale; each names its own run). When `doc_path` is not
/// empty, also replaces the text between "<!-- qtune-bench:begin -->" and
/// "<!-- qtune-bench:end -->" in that file with the same report (links rewritten relative to
/// it, headings one level down). Throws UserError when the file lacks the markers.
void write_bench_report(const BenchOptions& options, const std::string& doc_path);

/// True when a gnuplot executable is on PATH.
bool gnuplot_available();

}  // namespace qtune
