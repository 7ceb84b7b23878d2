// qtune-bench end to end on tiny configurations: every sub-command runs, writes CSV with the
// expected columns and markdown, covers every quantization plugin the registry finds, records a
// rejected option set instead of crashing, regenerates a marked doc section, and turns user
// errors into one line with exit code 2. No timing is asserted.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>

#include "qtune/model.h"
#include "qtune/model_files.h"
#include "qtune/tokenizer.h"
#include "qtune/tuning_spec.h"
#include "test_util.h"

using qtune::test::bin_path;
using qtune::test::data_path;
using qtune::test::read_file;
using qtune::test::run_program;

namespace {

using Row = std::vector<std::string>;

// RFC 4180: fields separated by commas, quoted when they hold commas or quotes ("" = ").
std::vector<Row> parse_csv(const std::string& text) {
  std::vector<Row> rows;
  Row row;
  std::string field;
  bool quoted = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (quoted) {
      if (c == '"' && i + 1 < text.size() && text[i + 1] == '"') {
        field += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        field += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      row.push_back(field);
      field.clear();
    } else if (c == '\n') {
      row.push_back(field);
      field.clear();
      rows.push_back(row);
      row.clear();
    } else {
      field += c;
    }
  }
  return rows;
}

struct Csv {
  Row header;
  std::vector<Row> rows;
  size_t col(const std::string& name) const {
    auto it = std::find(header.begin(), header.end(), name);
    EXPECT_NE(it, header.end()) << "no column " << name;
    return static_cast<size_t>(it - header.begin());
  }
  std::string at(size_t r, const std::string& name) const { return rows.at(r).at(col(name)); }
};

Csv read_csv(const std::string& path) {
  auto all = parse_csv(read_file(path));
  Csv c;
  EXPECT_FALSE(all.empty()) << path << " is empty or missing";
  if (all.empty()) return c;
  c.header = all[0];
  c.rows.assign(all.begin() + 1, all.end());
  for (const auto& r : c.rows) EXPECT_EQ(r.size(), c.header.size()) << path << ": ragged row";
  return c;
}

std::vector<std::string> quant_plugins() {
  auto r = run_program(
      {bin_path("qtune-bench"), "--list-plugins", "--plugin_dir", qtune::test::plugin_dir()});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  std::vector<std::string> names;
  std::istringstream in(r.output);
  for (std::string line; std::getline(in, line);) {
    std::istringstream ls(line);
    std::string kind, name;
    ls >> kind >> name;
    if (kind == "quant") names.push_back(name);
  }
  EXPECT_FALSE(names.empty()) << r.output;
  return names;
}

// Flags every run shares: single-threaded (ctest runs tests in parallel), the shared data.
std::vector<std::string> bench(const std::string& command, const std::string& out) {
  return {bin_path("qtune-bench"),
          command,
          "--out",
          out,
          "--doc",
          "",
          "--plugin_dir",
          qtune::test::plugin_dir(),
          "--threads",
          "1",
          "--model",
          data_path("stories260K.bin"),
          "--tokenizer",
          data_path("tok512.bin")};
}

void expect_columns(const Csv& c, const std::vector<std::string>& want) {
  EXPECT_EQ(c.header, want);
}

}  // namespace

TEST(Bench, QuantCoversEveryBackendWithExpectedColumns) {
  const auto out = qtune::test::temp_dir("bench_quant");
  auto args = bench("quant", out);
  for (const char* a :
       {"--matrices", "model,gaussian:64x128", "--repeats", "1", "--warmup", "0", "--tokens", "8"})
    args.push_back(a);
  auto r = run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  Csv c = read_csv(out + "/quant.csv");
  expect_columns(c, {"matrix",
                     "shape",
                     "set",
                     "short_set",
                     "backend",
                     "numel",
                     "nbytes",
                     "bits_per_param",
                     "rel_frob_err",
                     "nmse",
                     "max_abs_err",
                     "error_bound",
                     "quantize_ms",
                     "dequant_fp32_ms",
                     "dequant_fp32_gbs",
                     "memcpy_fp32_gbs",
                     "dequant_fp32_vs_memcpy",
                     "dequant_bf16_ms",
                     "dequant_bf16_gbs",
                     "memcpy_bf16_gbs",
                     "dequant_bf16_vs_memcpy",
                     "linear_fp32_ms",
                     "dense_fp32_ms",
                     "linear_fp32_ratio",
                     "linear_bf16_ms",
                     "dense_bf16_ms",
                     "linear_bf16_ratio",
                     "tokens",
                     "threads",
                     "device",
                     "status",
                     "options"});
  std::set<std::string> ok_backends, matrices;
  for (size_t i = 0; i < c.rows.size(); ++i) {
    matrices.insert(c.at(i, "matrix"));
    if (c.at(i, "status") != "ok") continue;
    ok_backends.insert(c.at(i, "backend"));
    const double bits = std::stod(c.at(i, "bits_per_param"));
    EXPECT_GT(bits, 0.5) << c.at(i, "set");
    EXPECT_LT(bits, 32.0) << c.at(i, "set");
    const double err = std::stod(c.at(i, "rel_frob_err"));
    EXPECT_GE(err, 0.0);
    EXPECT_LT(err, 1.0) << c.at(i, "set");
    EXPECT_NEAR(std::stod(c.at(i, "nmse")), err * err, 1e-6 + 1e-4 * err * err);
    EXPECT_FALSE(c.at(i, "linear_fp32_ratio").empty());
    EXPECT_EQ(c.at(i, "threads"), "1");
  }
  for (const auto& name : quant_plugins()) EXPECT_TRUE(ok_backends.count(name)) << name;
  EXPECT_EQ(matrices.size(), 2u);
  EXPECT_TRUE(matrices.count("gaussian 64x128"));
  const std::string md = read_file(out + "/quant.md");
  EXPECT_NE(md.find("| matrix | set | bits_per_param |"), std::string::npos) << md;
  EXPECT_NE(read_file(out + "/quant_error.gp").find("plot "), std::string::npos);
  EXPECT_NE(read_file(out + "/report.md").find("quant: quantization backends"), std::string::npos);
}

TEST(Bench, RejectedOptionSetIsARowNotACrash) {
  const auto out = qtune::test::temp_dir("bench_reject");
  const std::string backend = quant_plugins().at(0);
  auto args = bench("quant", out);
  for (const std::string a :
       {std::string("--matrices"), std::string("gaussian:32x64"), std::string("--repeats"),
        std::string("1"), std::string("--tokens"), std::string("4"), std::string("--quant_sets"),
        backend + ":{\"no_such_option\":1};" + backend + ":{}"})
    args.push_back(a);
  auto r = run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  Csv c = read_csv(out + "/quant.csv");
  ASSERT_EQ(c.rows.size(), 2u);
  EXPECT_EQ(c.at(0, "status").rfind("rejected: ", 0), 0u) << c.at(0, "status");
  EXPECT_NE(c.at(0, "status").find("no_such_option"), std::string::npos) << c.at(0, "status");
  EXPECT_EQ(c.at(1, "status"), "ok");
}

TEST(Bench, PplHasBaselineAndEverySet) {
  const auto out = qtune::test::temp_dir("bench_ppl");
  const auto names = quant_plugins();
  std::string sets;
  for (const auto& n : names) sets += n + ":{};";
  auto args = bench("ppl", out);
  for (const std::string a :
       {std::string("--ppl_text"), data_path("tinystories_val_head.txt"),
        std::string("--ppl_max_blocks"), std::string("2"), std::string("--ppl_seq_len"),
        std::string("128"), std::string("--quant_sets"), sets})
    args.push_back(a);
  auto r = run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  Csv c = read_csv(out + "/ppl.csv");
  expect_columns(c, {"set", "short_set", "backend", "bits_per_param", "linear_weight_mb",
                     "base_weight_mb", "loss", "ppl", "ppl_ratio", "delta_loss", "tokens", "eval_s",
                     "build_s", "seq_len", "scoring", "threads", "status", "options"});
  ASSERT_EQ(c.rows.size(), names.size() + 1);
  EXPECT_EQ(c.at(0, "set"), "none (fp32)");
  EXPECT_EQ(std::stod(c.at(0, "ppl_ratio")), 1.0);
  EXPECT_EQ(c.at(0, "tokens"), "256");
  // stories260K is a trained model: in-domain text is far from uniform (ppl 512).
  EXPECT_LT(std::stod(c.at(0, "ppl")), 20.0);
  for (size_t i = 1; i < c.rows.size(); ++i) {
    EXPECT_EQ(c.at(i, "status"), "ok") << c.at(i, "set");
    EXPECT_EQ(c.at(i, "backend"), names[i - 1]);
    EXPECT_LT(std::stod(c.at(i, "linear_weight_mb")), std::stod(c.at(0, "linear_weight_mb")));
  }
}

// --ppl_scoring llama is llama-perplexity's protocol (llama.cpp tools/perplexity): chunks of
// n_ctx tokens of the BOS-prefixed stream, the first token of each replaced by BOS, the
// predictions from position n_ctx / 2 on scored. Recomputed here from the model's logits.
TEST(Bench, PplLlamaScoringIsLlamaPerplexitysProtocol) {
  const auto out = qtune::test::temp_dir("bench_ppl_llama");
  const int64_t n_ctx = 64, chunks = 3;
  auto args = bench("ppl", out);
  for (const std::string a :
       {std::string("--ppl_text"), data_path("tinystories_val_head.txt"),
        std::string("--ppl_max_blocks"), std::to_string(chunks), std::string("--ppl_seq_len"),
        std::to_string(n_ctx), std::string("--ppl_scoring"), std::string("llama"),
        std::string("--quant_sets"), quant_plugins().at(0) + ":{}"})
    args.push_back(a);
  auto r = run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  Csv c = read_csv(out + "/ppl.csv");
  ASSERT_EQ(c.rows.size(), 2u);
  EXPECT_EQ(c.at(0, "scoring"), "llama");
  EXPECT_EQ(std::stoll(c.at(0, "tokens")), chunks * (n_ctx - 1 - n_ctx / 2));

  qtune::ModelFiles files = qtune::open_model(data_path("stories260K.bin"));
  auto tok = qtune::load_tokenizer(data_path("tok512.bin"));
  const std::vector<int> ids = tok->encode(read_file(data_path("tinystories_val_head.txt")),
                                           /*bos=*/true, /*eos=*/false);
  qtune::LlamaForCausalLM model(files.config, *files.weights,
                                qtune::TuningSpec::for_base(torch::kFloat32));
  model->eval();
  torch::NoGradGuard no_grad;
  double nll = 0;
  int64_t count = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    std::vector<int64_t> chunk(ids.begin() + k * n_ctx, ids.begin() + (k + 1) * n_ctx);
    const std::vector<int64_t> original = chunk;
    chunk[0] = tok->bos_id();
    const auto logp = torch::log_softmax(
        model->forward(torch::tensor(chunk, torch::kLong).view({1, n_ctx}))[0].to(torch::kDouble),
        -1);
    for (int64_t j = n_ctx / 2; j < n_ctx - 1; ++j, ++count)
      nll -= logp[j][original[j + 1]].item<double>();
  }
  EXPECT_NEAR(std::stod(c.at(0, "loss")), nll / static_cast<double>(count), 1e-5);
  // Not the stream protocol: every token scored there gives another mean.
  args.back() = quant_plugins().at(0) + ":{}";
  *(std::find(args.begin(), args.end(), "llama")) = "stream";
  r = run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(read_csv(out + "/ppl.csv").at(0, "loss"), c.at(0, "loss"));

  // Modules kept dense, as llama.cpp keeps some at higher precision: more bytes, and a loss
  // nearer the unquantized one.
  args.push_back("--ppl_skip_modules");
  args.push_back("down_proj,lm_head");
  r = run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Csv all = read_csv(out + "/ppl.csv");
  args.resize(args.size() - 2);
  r = run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Csv none = read_csv(out + "/ppl.csv");
  EXPECT_GT(std::stod(all.at(1, "linear_weight_mb")), std::stod(none.at(1, "linear_weight_mb")));
  EXPECT_LT(std::abs(std::stod(all.at(1, "delta_loss"))),
            std::abs(std::stod(none.at(1, "delta_loss"))));
}

// --finetune_ranks 1,2: every configuration also on two ranks (c10d over loopback) with the same
// global batch, which trains the same model: the same validation loss, gradients all-reduced.
// --finetune_size: a synthetic model instead of --model.
TEST(Bench, FinetuneRanksRunDataParallelOnTheSameGlobalBatch) {
  const auto out = qtune::test::temp_dir("bench_ranks");
  auto args = bench("finetune", out);
  for (const std::string a :
       {std::string("--finetune_size"), std::string("tiny"), std::string("--finetune_data"),
        data_path("tinyshakespeare.txt"), std::string("--finetune_steps"), std::string("3"),
        std::string("--finetune_batch"), std::string("2"), std::string("--finetune_seq_len"),
        std::string("32"), std::string("--finetune_eval_every"), std::string("0"),
        std::string("--finetune_ranks"), std::string("1,2"), std::string("--quant_sets"),
        quant_plugins().at(0) + ":{}"})
    args.push_back(a);
  auto r = run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  Csv c = read_csv(out + "/finetune.csv");
  ASSERT_EQ(c.rows.size(), 6u);  // full, lora, qlora, each on 1 and 2 ranks
  for (size_t i = 0; i < c.rows.size(); i += 2) {
    const std::string one = c.at(i, "config");
    EXPECT_EQ(c.at(i + 1, "config"), one + " x2 ranks");
    EXPECT_EQ(c.at(i, "status"), "ok") << one;
    EXPECT_EQ(c.at(i + 1, "status"), "ok") << one;
    EXPECT_EQ(c.at(i + 1, "ranks"), "2");
    EXPECT_EQ(std::stod(c.at(i, "allreduce_mb")), 0.0) << one;
    EXPECT_GT(std::stod(c.at(i + 1, "allreduce_mb")), 0.0) << one;
    EXPECT_GT(std::stod(c.at(i + 1, "dp_efficiency")), 0.0) << one;
    EXPECT_NEAR(std::stod(c.at(i + 1, "final_val_loss")), std::stod(c.at(i, "final_val_loss")),
                1e-4)
        << one;
  }
  // A rank count that does not divide the global batch is refused before anything runs.
  *std::find(args.begin(), args.end(), "1,2") = "3";
  r = run_program(args);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--finetune_ranks: 3 ranks must be in [1, 64] and divide"),
            std::string::npos)
      << r.output;
}

// --finetune_pack on instruction records: the same runs with less padding, so more of each
// step's tokens are real.
TEST(Bench, FinetunePackingLowersPadding) {
  const auto out = qtune::test::temp_dir("bench_pack");
  auto args = bench("finetune", out);
  for (const std::string a :
       {std::string("--finetune_data"), data_path("alpaca_sample102.json"),
        std::string("--finetune_steps"), std::string("2"), std::string("--finetune_batch"),
        std::string("2"), std::string("--finetune_seq_len"), std::string("512"),
        std::string("--finetune_eval_every"), std::string("0"), std::string("--quant_sets"),
        quant_plugins().at(0) + ":{}"})
    args.push_back(a);
  auto r = run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Csv plain = read_csv(out + "/finetune.csv");
  args.push_back("--finetune_pack");
  r = run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Csv packed = read_csv(out + "/finetune.csv");
  ASSERT_EQ(plain.rows.size(), packed.rows.size());
  for (size_t i = 0; i < plain.rows.size(); ++i) {
    EXPECT_EQ(plain.at(i, "packed"), "false");
    EXPECT_EQ(packed.at(i, "packed"), "true");
    // Greedy packing in file order (torchtune's) still leaves the tail of each sequence empty
    // when the next record does not fit: here 38% of positions are padding plain, 25% packed.
    EXPECT_LT(std::stod(packed.at(i, "padding_pct")), std::stod(plain.at(i, "padding_pct")) - 5)
        << plain.at(i, "config");
  }
}

TEST(Bench, FinetuneRunsFullLoraAndQlora) {
  const auto out = qtune::test::temp_dir("bench_finetune");
  const std::string backend = quant_plugins().at(0);
  auto args = bench("finetune", out);
  for (const std::string a :
       {std::string("--finetune_data"), data_path("tinyshakespeare.txt"),
        std::string("--finetune_steps"), std::string("4"), std::string("--finetune_batch"),
        std::string("2"), std::string("--finetune_seq_len"), std::string("32"),
        std::string("--finetune_eval_every"), std::string("2"), std::string("--quant_sets"),
        backend + ":{}"})
    args.push_back(a);
  auto r = run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  Csv c = read_csv(out + "/finetune.csv");
  expect_columns(c, {"config",
                     "train_type",
                     "backend",
                     "dtype",
                     "steps",
                     "batch",
                     "seq_len",
                     "lr",
                     "first_val_loss",
                     "final_val_loss",
                     "best_val_loss",
                     "final_train_loss",
                     "tokens_per_s",
                     "ranks",
                     "threads_per_rank",
                     "dp_efficiency",
                     "allreduce_ms",
                     "allreduce_mb",
                     "packed",
                     "padding_pct",
                     "real_tokens_per_s",
                     "step_ms",
                     "step_ratio_vs_lora",
                     "peak_rss_mb",
                     "base_weight_mb",
                     "linear_weight_mb",
                     "trainable_params",
                     "total_params",
                     "trainer_tokens_per_s",
                     "threads",
                     "status",
                     "options"});
  ASSERT_EQ(c.rows.size(), 3u);
  EXPECT_EQ(c.at(0, "config"), "full");
  EXPECT_EQ(c.at(1, "config"), "lora");
  EXPECT_EQ(c.at(2, "config"), "qlora " + backend);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(c.at(i, "status"), "ok") << c.at(i, "config");
    EXPECT_GT(std::stod(c.at(i, "peak_rss_mb")), 1.0);
  }
  EXPECT_EQ(std::stod(c.at(1, "step_ratio_vs_lora")), 1.0);
  // QLoRA holds fewer base bytes than LoRA and trains the same adapter parameters.
  EXPECT_LT(std::stod(c.at(2, "base_weight_mb")), std::stod(c.at(1, "base_weight_mb")));
  EXPECT_EQ(c.at(2, "trainable_params"), c.at(1, "trainable_params"));
  Csv curves = read_csv(out + "/finetune_curves.csv");
  expect_columns(curves, {"config", "step", "train_loss", "train_loss_avg10", "val_loss"});
  EXPECT_EQ(curves.rows.size(), 3u * 5u);  // steps 0 (eval only) .. 4, per configuration
}

TEST(Bench, ScaleRunsLoraAndQloraPerBackend) {
  const auto out = qtune::test::temp_dir("bench_scale");
  const auto names = quant_plugins();
  auto args = bench("scale", out);
  for (const char* a :
       {"--scale_sizes", "tiny:1", "--scale_steps", "1", "--scale_seq_len", "16", "--warmup", "0",
        "--scale_checkpointing"})
    args.push_back(a);
  auto r = run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  Csv c = read_csv(out + "/scale.csv");
  expect_columns(c, {"size",
                     "params_m",
                     "hidden",
                     "layers",
                     "intermediate",
                     "dtype",
                     "config",
                     "train_type",
                     "backend",
                     "batch",
                     "seq_len",
                     "steps",
                     "checkpointing",
                     "ranks",
                     "shard_base",
                     "shard_optimizer",
                     "build_s",
                     "rss_start_mb",
                     "build_peak_mb",
                     "rss_built_mb",
                     "train_peak_mb",
                     "peak_rss_mb",
                     "base_weight_mb",
                     "linear_weight_mb",
                     "step_ms",
                     "tokens_per_s",
                     "step_ratio_vs_lora",
                     "rank_base_weight_mb",
                     "gather_s_per_step",
                     "trainable_params",
                     "threads",
                     "status",
                     "options"});
  ASSERT_EQ(c.rows.size(), names.size() + 1);  // lora + one qlora per backend
  EXPECT_EQ(c.at(0, "config"), "lora");
  std::set<std::string> backends;
  for (size_t i = 0; i < c.rows.size(); ++i) {
    EXPECT_EQ(c.at(i, "status"), "ok") << c.at(i, "config");
    EXPECT_EQ(c.at(i, "dtype"), "bf16");
    EXPECT_EQ(c.at(i, "size"), "tiny:1");
    EXPECT_EQ(c.at(i, "layers"), "1");  // tiny's shapes with one decoder layer instead of two
    EXPECT_EQ(c.at(i, "hidden"), "64");
    EXPECT_EQ(c.at(i, "checkpointing"), "true");  // lora and qlora train with it
    EXPECT_EQ(c.at(i, "ranks"), "1");
    EXPECT_GE(std::stod(c.at(i, "peak_rss_mb")), std::stod(c.at(i, "rss_built_mb")));
    EXPECT_GE(std::stod(c.at(i, "build_peak_mb")), std::stod(c.at(i, "rss_built_mb")));
    EXPECT_GT(std::stod(c.at(i, "train_peak_mb")), 0.0);
    if (i > 0) backends.insert(c.at(i, "backend"));
  }
  for (const auto& n : names) EXPECT_TRUE(backends.count(n)) << n;
  Csv slope = read_csv(out + "/scale_slope.csv");
  expect_columns(
      slope, {"dtype", "config", "sizes", "train_peak_bytes_per_param", "train_peak_intercept_mb",
              "build_peak_bytes_per_param", "base_bytes_per_param"});
}

TEST(Bench, RegeneratesTheMarkedSectionOfADoc) {
  const auto dir = qtune::test::temp_dir("bench_doc");
  const std::string doc = dir + "/benchmarks.md";
  {
    std::ofstream f(doc);
    f << "# Benchmarks\n\nhand-written intro\n\n<!-- qtune-bench:begin -->\nstale\n"
         "<!-- qtune-bench:end -->\n\nhand-written reading\n";
  }
  auto args = bench("quant", dir + "/bench/");
  args.erase(std::find(args.begin(), args.end(), "--doc"),
             std::find(args.begin(), args.end(), "--doc") + 2);
  for (const char* a : {"--matrices", "gaussian:32x64", "--repeats", "1", "--tokens", "4"})
    args.push_back(a);
  auto r = run_program(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string text = read_file(doc);
  EXPECT_EQ(text.find("stale"), std::string::npos) << text;
  EXPECT_NE(text.find("hand-written intro"), std::string::npos);
  EXPECT_NE(text.find("hand-written reading"), std::string::npos);
  EXPECT_NE(text.find("(bench/quant.csv)"), std::string::npos) << text;
  // The command line, after the environment that changes results (OMP_NUM_THREADS) if set.
  const size_t command = text.find("Command: `");
  ASSERT_NE(command, std::string::npos) << text;
  EXPECT_NE(text.find("qtune-bench quant --out", command), std::string::npos) << text;
}

TEST(Bench, UserErrorsAreOneLineWithExitCode2) {
  const auto out = qtune::test::temp_dir("bench_errors");
  const std::vector<std::vector<std::string>> cases = {
      {"no_such_command"},
      {"quant", "--quant_sets", "no_such_backend:{}"},
      {"quant", "--quant_sets", "x:{not json"},
      {"quant", "--matrices", "gaussian:12by3"},
      {"scale", "--scale_sizes", "7T"},
      {"scale", "--scale_sizes", "tiny:0"},
      {"scale", "--scale_sizes", "tiny:3"},  // tiny has 2 layers
      {"scale", "--scale_sizes", "7B:x"},
      {"quant", "--device", "tpu"},
  };
  for (const auto& extra : cases) {
    std::vector<std::string> args{bin_path("qtune-bench")};
    args.insert(args.end(), extra.begin(), extra.end());
    for (const std::string a : {std::string("--out"), out, std::string("--doc"), std::string(""),
                                std::string("--plugin_dir"), qtune::test::plugin_dir()})
      args.push_back(a);
    auto r = run_program(args);
    EXPECT_EQ(r.exit_code, 2) << extra[0] << ": " << r.output;
    EXPECT_EQ(r.output.rfind("qtune-bench: error: ", 0), 0u) << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  }
}
