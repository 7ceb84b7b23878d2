// qtune-bench ppl, finetune and scale: whole models. ppl evaluates a quantized base in-process;
// finetune and scale run each configuration in a fresh child process (this executable with a
// hidden sub-command), so each one's peak RSS is its own, and collect what the child wrote.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "bench_internal.h"
#include "qtune/atomic_file.h"
#include "bench.h"
#include "qtune/data.h"
#include "qtune/error.h"
#include "qtune/files.h"
#include "qtune/gradient_buckets.h"
#include "qtune/optimizer_shards.h"
#include "qtune/model.h"
#include "qtune/model_files.h"
#include "qtune/process_group.h"
#include "qtune/recipe.h"
#include "qtune/sharded_base.h"
#include "qtune/tokenizer.h"
#include "qtune/train.h"
#include "qtune/weight_source.h"

namespace fs = std::filesystem;

namespace qtune {

using namespace bench_detail;

namespace {

using clock_type = std::chrono::steady_clock;

// Seconds of timed steps a scale configuration aims for (see scale_child).
constexpr double kScaleStepBudgetS = 3.0;

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

// A child that failed: its exit code and the last line it printed, without the program prefix.
std::string child_status(int rc, const std::string& log) {
  std::string line = last_line(log);
  const std::string prefix = "qtune-bench: error: ";
  if (line.rfind(prefix, 0) == 0) line = line.substr(prefix.size());
  if (rc == 2) return "rejected: " + line;
  if (rc > 128) return "failed: killed by signal " + std::to_string(rc - 128) + " (" + line + ")";
  return "failed (exit " + std::to_string(rc) + "): " + line;
}

std::string comma_list(const std::vector<std::string>& items) {
  std::string s;
  for (const auto& i : items) s += (s.empty() ? "" : ", ") + i;
  return s;
}

int64_t linear_params(const LlamaForCausalLMImpl& m) {
  int64_t n = 0;
  for (const auto& [_, s] : m.slots()) n += s->in_features() * s->out_features();
  return n;
}

// Series colours and dash patterns for up to 16 lines.
std::string line_style(size_t i) {
  return "lt " + std::to_string(i % 8 + 1) + " dt " + std::to_string(i / 8 + 1);
}

// A random-weight bf16 HF checkpoint of a synthetic size in `work_dir`, written once by a child
// (its memory is not the parent's) and reused when present.
std::string synthetic_model(const BenchOptions& o, const std::string& work_dir,
                            const std::string& size, int threads) {
  const ModelConfig cfg = synthetic_config(size, "--scale_sizes");
  const std::string model_dir = work_dir + "/model_" + slug(size);
  if (fs::exists(model_dir + "/config.json")) return model_dir;
  const Json spec = {{"config", cfg.to_hf_json()},
                     {"seed", static_cast<int64_t>(o.seed)},
                     {"dtype", "bf16"},
                     {"threads", threads},
                     {"model_dir", model_dir}};
  fs::create_directories(model_dir);
  atomic_write_string(model_dir + "/spec.json", spec.dump(2) + "\n");
  spdlog::info("bench: writing a random {} checkpoint ({:.0f}M parameters)", size,
               cfg.num_parameters() / 1e6);
  const std::string log = model_dir + "/log.txt";
  const int rc = run_child(o.self_exe, {"__synthesize", model_dir + "/spec.json"}, log);
  QTUNE_CHECK(rc == 0, "bench: writing the synthetic ", size,
              " checkpoint failed: ", child_status(rc, log));
  return model_dir;
}

// The markdown/CSV label of a (train type, set) configuration.
struct RunConfig {
  std::string label;  // "full", "lora", "qlora nf4 double_quant=false"
  TrainType type;
  const QuantSet* set = nullptr;
};

std::vector<RunConfig> run_configs(bool with_full, const std::vector<QuantSet>& sets) {
  std::vector<RunConfig> out;
  if (with_full) out.push_back({"full", TrainType::kFull, nullptr});
  out.push_back({"lora", TrainType::kLora, nullptr});
  for (const auto& s : sets) out.push_back({"qlora " + s.label(), TrainType::kQlora, &s});
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ppl

BenchResult bench_ppl(const BenchOptions& o, const Registry& registry) {
  const auto t_start = clock_type::now();
  torch::NoGradGuard no_grad;
  const int threads = apply_threads(o.threads);
  const std::string model_path = resolve_data_path(o.model_path, "--model");
  ModelFiles files = open_model(model_path);
  std::string tok_path = o.tokenizer_path.empty()
                             ? files.tokenizer_path
                             : resolve_data_path(o.tokenizer_path, "--tokenizer");
  QTUNE_CHECK(!tok_path.empty(), "--tokenizer: ", model_path, " has no tokenizer beside it");
  auto tokenizer = load_tokenizer(tok_path);
  const std::string text = resolve_data_path(o.ppl_text, "--ppl_text");
  const int64_t seq = o.ppl_seq_len > 0 ? o.ppl_seq_len : files.config.max_position_embeddings;
  QTUNE_CHECK(seq <= files.config.max_position_embeddings, "--ppl_seq_len ", seq,
              " exceeds the model's max_position_embeddings ",
              files.config.max_position_embeddings);
  // The whole file as one token stream (BOS once, at the start), cut into non-overlapping
  // windows of seq + 1 tokens sharing one token, the way llama2.c measures its validation loss
  // and perplexity tools read a text file. Blank lines are text ("\n\n" tokens), not document
  // breaks: in TinyStories they separate paragraphs inside a story as often as stories.
  std::string content;
  {
    std::ifstream in(text, std::ios::binary);
    QTUNE_CHECK(in.good(), "--ppl_text: cannot read ", text);
    std::stringstream ss;
    ss << in.rdbuf();
    content = ss.str();
  }
  const bool llama = o.ppl_scoring == "llama";
  const bool bos = tokenizer->bos_id() >= 0 && tokenizer->config().add_bos_token;
  const std::vector<int> ids = tokenizer->encode(content, /*bos=*/llama ? bos : true, false);
  const int64_t n_ids = static_cast<int64_t>(ids.size());
  // stream: windows of seq + 1 tokens sharing one. llama: chunks of seq tokens (n_ids / seq of
  // them, the tail dropped; llama-perplexity wants at least two), in tools/perplexity of
  // llama.cpp: the first token of each chunk replaced by BOS, and of the seq - 1 next-token
  // predictions only those from position seq / 2 on scored (seq - 1 - seq / 2 per chunk).
  int64_t blocks = llama ? n_ids / seq : (n_ids - 1) / seq;
  if (o.ppl_max_blocks > 0) blocks = std::min(blocks, o.ppl_max_blocks);
  QTUNE_CHECK(blocks > 0, "--ppl_text: ", text, " has ", ids.size(), " tokens, fewer than one ",
              llama ? "chunk of " : "block of ", llama ? seq : seq + 1);
  QTUNE_CHECK(!llama || seq >= 2, "--ppl_scoring llama needs --ppl_seq_len >= 2, got ", seq);
  torch::Tensor stream = torch::tensor(std::vector<int64_t>(ids.begin(), ids.end()), torch::kLong);
  // inputs [nb, seq] and targets [nb, seq] of blocks b0 .. b0 + nb
  auto block_batch = [&](int64_t b0, int64_t nb) -> std::pair<torch::Tensor, torch::Tensor> {
    if (!llama) {
      torch::Tensor win = stream.narrow(0, b0 * seq, nb * seq + 1);
      return {win.narrow(0, 0, nb * seq).view({nb, seq}), win.narrow(0, 1, nb * seq).view({nb, seq})};
    }
    torch::Tensor x = stream.narrow(0, b0 * seq, nb * seq).view({nb, seq}).clone();
    torch::Tensor y = torch::full({nb, seq}, kIgnoreIndex, torch::kLong);
    const int64_t first = seq / 2;
    y.narrow(1, first, seq - 1 - first).copy_(x.narrow(1, first + 1, seq - 1 - first));
    if (bos) x.select(1, 0).fill_(tokenizer->bos_id());
    return {x, y};
  };
  constexpr int64_t kBatch = 8;

  BenchTable table("ppl", "Perplexity with every linear weight quantized",
                   {{"set", 4, true},
                    {"short_set", 4, false},
                    {"backend", 4, false},
                    {"bits_per_param", 4, true},
                    {"linear_weight_mb", 4, true},
                    {"base_weight_mb", 4, false},
                    {"loss", 5, true},
                    {"ppl", 5, true},
                    {"ppl_ratio", 4, true},
                    {"delta_loss", 3, true},
                    {"tokens", 4, true},
                    {"eval_s", 3, true},
                    {"build_s", 3, false},
                    {"seq_len", 4, false},
                    {"scoring", 4, false},
                    {"threads", 4, false},
                    {"status", 4, true},
                    {"options", 4, false}});

  double base_loss = NAN;
  auto run = [&](const QuantSet* set) {
    Json row = {{"set", set ? set->label() : "none (fp32)"},
                {"short_set", set ? set->short_label() : "none (fp32)"},
                {"backend", set ? set->backend : "none"},
                {"seq_len", seq},
                {"scoring", o.ppl_scoring},
                {"threads", threads},
                {"options", set ? set->options.dump() : "{}"}};
    try {
      // The base alone: frozen fp32, or quantized by the set's backend.
      TuningSpec spec =
          set ? TuningSpec::for_base(torch::kFloat32, registry.quant(set->backend), set->options)
              : TuningSpec::for_base(torch::kFloat32);
      if (set) spec.base.quant_skip_modules = o.ppl_skip_modules;
      if (set) row["options"] = spec.base.quant_options.dump();
      auto t0 = clock_type::now();
      LlamaForCausalLM model(files.config, *files.weights, spec);
      model->to(o.device);
      model->eval();
      row["build_s"] = seconds_since(t0);
      t0 = clock_type::now();
      double sum = 0;
      int64_t count = 0;
      for (int64_t b0 = 0; b0 < blocks; b0 += kBatch) {
        const int64_t nb = std::min(kBatch, blocks - b0);
        auto [x, y] = block_batch(b0, nb);
        auto [loss, n] = model->loss(x.to(o.device), y.to(o.device));
        sum += loss.item<double>() * static_cast<double>(n);
        count += n;
      }
      row["eval_s"] = seconds_since(t0);
      const double loss = sum / static_cast<double>(std::max<int64_t>(1, count));
      if (!set) base_loss = loss;
      row["loss"] = loss;
      row["ppl"] = std::exp(loss);
      row["ppl_ratio"] = std::exp(loss - base_loss);
      row["delta_loss"] = loss - base_loss;
      row["tokens"] = count;
      row["linear_weight_mb"] = model->linear_weight_bytes() / 1e6;
      row["base_weight_mb"] = model->base_weight_bytes() / 1e6;
      row["bits_per_param"] = 8.0 * static_cast<double>(model->linear_weight_bytes()) /
                              static_cast<double>(linear_params(*model));
      row["status"] = "ok";
      spdlog::info("bench ppl: {}: loss {:.4f} ppl {:.3f} ({} tokens)",
                   row["set"].get<std::string>(), loss, std::exp(loss), count);
    } catch (const std::exception& e) {
      if (!set) throw;  // the unquantized model must work: anything wrong is the user's input
      row["status"] =
          (dynamic_cast<const UserError*>(&e) ? "rejected: " : "failed: ") + first_line(e);
      spdlog::warn("bench ppl: {}: {}", set->label(), row["status"].get<std::string>());
    }
    table.add(row);
  };
  run(nullptr);
  for (const auto& s : o.quant_sets) run(&s);

  table.notes = {
      "Mean next-token cross-entropy (*loss*, nats) and perplexity exp(loss) of `" +
          fs::path(model_path).filename().string() + "` on `" + fs::path(text).filename().string() +
          "`, " +
          (llama ? "scored as llama.cpp's llama-perplexity does (chunks of " + std::to_string(seq) +
                       " tokens, BOS first, the second half of each chunk scored)"
                 : "cut into blocks of " + std::to_string(seq) +
                       " tokens (the file as one token stream, BOS at its start, like "
                       "llama2.c's validation loss)") +
          ", with every linear projection quantized by the set" +
          (o.ppl_skip_modules.empty() ? std::string()
                                      : " but those matching " + comma_list(o.ppl_skip_modules)) +
          " (the output head too, as "
          "under QLoRA; embeddings and norms stay fp32); compute in fp32. *ppl_ratio* and "
          "*delta_loss* are against the unquantized model in the same run. *bits_per_param* "
          "counts the linear weights' `nbytes()`.",
  };

  BenchResult result;
  result.command = "ppl";
  {
    std::ostringstream gp;
    gp << gp_preamble("ppl.png", 1000, 560);
    gp << gp_datablock("p", table, {"short_set", "ppl", "bits_per_param"},
                       [&](size_t r) { return table.at(r, "status") == "ok"; });
    size_t n = 0;
    for (size_t r = 0; r < table.rows().size(); ++r) n += table.at(r, "status") == "ok";
    gp << "set title "
       << gp_quote("Perplexity of " + fs::path(model_path).stem().string() + " on " +
                   fs::path(text).filename().string())
       << "\nset style data histograms\nset style fill solid 0.85 border -1\nset boxwidth 0.8\n"
       << "set xtics rotate by -30 left font ',9'\nset ylabel 'perplexity (log)'\n"
       << "set logscale y\nset bmargin 7\nset rmargin 9\n"
       << "set key off\nset yrange [1:*]\nset xrange [-0.6:" << (n == 0 ? 0.6 : n - 0.4) << "]\n"
       << "plot $p using 2:xtic(sprintf('%s (%.2f b)', strcol(1), $3)) lc rgb '#4477aa', \\\n"
       << "     $p using 0:2:(sprintf('%.3g', $2)) with labels offset 0,0.7 font ',8'";
    if (std::isfinite(base_loss))
      gp << ", \\\n     " << std::exp(base_loss) << " with lines dt 2 lc rgb 'black'";
    gp << "\n";
    result.plots.push_back({"ppl", "perplexity per option set", gp.str()});
  }
  result.tables.push_back(std::move(table));
  result.seconds = seconds_since(t_start);
  return result;
}

// ---------------------------------------------------------------------------------------------
// finetune

BenchResult bench_finetune(const BenchOptions& o, const Registry& registry) {
  const auto t_start = clock_type::now();
  QTUNE_CHECK(o.finetune_threads >= 0, "--finetune_threads must be >= 0, got ", o.finetune_threads);
  const int threads = apply_threads(o.finetune_threads > 0 ? o.finetune_threads : o.threads);
  QTUNE_CHECK(!o.self_exe.empty(), "bench: the path of qtune-bench itself is unknown");
  QTUNE_CHECK(o.device.is_cpu(), "--device ", o.device.str(),
              ": finetune runs the trainer, which trains on the CPU; use --device cpu");
  QTUNE_CHECK(o.finetune_steps > 0, "--finetune_steps must be > 0, got ", o.finetune_steps);
  auto adapter = pick_adapter(o, registry);
  const std::string tok_path =
      o.tokenizer_path.empty() ? "" : resolve_data_path(o.tokenizer_path, "--tokenizer");
  const std::string data_path = resolve_data_path(o.finetune_data, "--finetune_data");
  WorkDir work(o);
  const std::string model_path = o.finetune_size.empty()
                                     ? resolve_data_path(o.model_path, "--model")
                                     : synthetic_model(o, work.path(), o.finetune_size, threads);
  // N ranks share the global batch and the threads: each takes batch / N rows on threads / N.
  auto threads_per_rank = [&](int64_t ranks) {
    return std::max<int64_t>(1, threads / ranks);
  };

  auto make_recipe = [&](const RunConfig& c, const std::string& out, int64_t ranks) {
    Recipe r = Recipe::from_json(recipe_defaults());
    r.model.path = model_path;
    r.model.tokenizer = tok_path;
    r.train_type = to_string(c.type);
    r.dtype = o.finetune_dtype;
    if (c.set) {
      r.quant.name = c.set->backend;
      r.quant.options = c.set->options;
    }
    r.adapter.name = adapter->name();
    r.adapter.options = o.adapter_options;
    r.data.path = data_path;
    r.data.format = "auto";
    r.data.val_fraction = 0.05;
    r.data.seq_len = o.finetune_seq_len;
    r.data.pack = o.finetune_pack;
    r.train.max_steps = o.finetune_steps;
    r.train.batch_size = o.finetune_batch / ranks;
    r.train.lr = c.type == TrainType::kFull ? o.finetune_full_lr : o.finetune_lr;
    r.train.warmup_steps = std::max<int64_t>(1, o.finetune_steps / 10);
    r.eval.every = o.finetune_eval_every;
    r.eval.max_batches = 8;
    r.log_every = std::max<int64_t>(1, o.finetune_steps / 5);
    r.seed = o.seed;
    r.threads = static_cast<int>(threads_per_rank(ranks));
    r.output_dir = out;
    r.plugin_dir = o.plugin_dir;
    return r.to_json();
  };

  const auto configs = run_configs(true, o.quant_sets);
  // The flags themselves are checked before any run: a bad path or value is the user's error,
  // not a row. A quant set the schema rejects becomes a row.
  {
    RunConfig lora{"lora", TrainType::kLora, nullptr};
    resolve_recipe(make_recipe(lora, work.path() + "/check", 1), registry);
  }

  BenchTable table("finetune", "The same short fine-tune: full, LoRA and QLoRA per backend",
                   {{"config", 4, true},
                    {"train_type", 4, false},
                    {"backend", 4, false},
                    {"dtype", 4, false},
                    {"steps", 4, false},
                    {"batch", 4, false},
                    {"seq_len", 4, false},
                    {"lr", 3, false},
                    {"first_val_loss", 4, false},
                    {"final_val_loss", 4, true},
                    {"best_val_loss", 4, false},
                    {"final_train_loss", 4, false},
                    {"tokens_per_s", 4, true},
                    {"ranks", 4, true},
                    {"threads_per_rank", 4, true},
                    {"dp_efficiency", 3, true},
                    {"allreduce_ms", 3, true},
                    {"allreduce_mb", 3, true},
                    {"packed", 4, false},
                    {"padding_pct", 3, true},
                    {"real_tokens_per_s", 4, true},
                    {"step_ms", 4, true},
                    {"step_ratio_vs_lora", 3, true},
                    {"peak_rss_mb", 4, true},
                    {"base_weight_mb", 4, true},
                    {"linear_weight_mb", 4, false},
                    {"trainable_params", 4, true},
                    {"total_params", 4, false},
                    {"trainer_tokens_per_s", 4, false},
                    {"threads", 4, false},
                    {"status", 4, true},
                    {"options", 4, false}});
  BenchTable curves("finetune_curves", "loss per step of every configuration",
                    {{"config", 4, true},
                     {"step", 4, true},
                     {"train_loss", 5, true},
                     {"train_loss_avg10", 5, true},
                     {"val_loss", 5, true}});
  curves.csv_only = true;

  double lora_step = NAN;
  std::map<std::string, double> one_rank_tps;  // config -> tokens/s of its 1-rank run
  std::vector<std::pair<RunConfig, int64_t>> runs;
  for (const auto& c : configs)
    for (int64_t n : o.finetune_ranks) runs.emplace_back(c, n);
  for (size_t i = 0; i < runs.size(); ++i) {
    const int64_t ranks = runs[i].second;
    RunConfig c = runs[i].first;
    const std::string base_label = c.label;
    if (ranks > 1) c.label += " x" + std::to_string(ranks) + " ranks";
    Json row = {{"config", c.label},
                {"train_type", to_string(c.type)},
                {"backend", c.set ? c.set->backend : ""},
                {"dtype", o.finetune_dtype},
                {"steps", o.finetune_steps},
                {"batch", o.finetune_batch},
                {"seq_len", o.finetune_seq_len},
                {"lr", c.type == TrainType::kFull ? o.finetune_full_lr : o.finetune_lr},
                {"threads", threads},
                {"ranks", ranks},
                {"threads_per_rank", threads_per_rank(ranks)},
                {"options", c.set ? c.set->options.dump() : ""}};
    const std::string dir = work.path() + "/" + std::to_string(i) + "_" + slug(c.label);
    fs::create_directories(dir);
    const Json recipe = make_recipe(c, dir, ranks);
    try {
      row["options"] = c.set ? resolve_recipe(recipe, registry).spec.base.quant_options.dump() : "";
    } catch (const UserError& e) {
      row["status"] = std::string("rejected: ") + e.what();
      table.add(row);
      continue;
    }
    const std::string recipe_path = dir + "/bench_recipe.json";
    atomic_write_string(recipe_path, recipe.dump(2) + "\n");
    const std::string log = dir + "/log.txt";
    spdlog::info("bench finetune: {} ({} steps)", c.label, o.finetune_steps);
    // Several ranks: a child that starts them as torchrun would (launch_local_ranks).
    const int rc = ranks == 1 ? run_child(o.self_exe, {"__finetune", recipe_path}, log)
                              : run_child(o.self_exe,
                                          {"__finetune_ranks", std::to_string(ranks), recipe_path},
                                          log);
    if (rc != 0) {
      row["status"] = child_status(rc, log);
      spdlog::warn("bench finetune: {}: {}", c.label, row["status"].get<std::string>());
      table.add(row);
      continue;
    }
    const Json s = read_json_file(dir + "/summary.json");
    std::vector<double> step_s;
    std::ifstream m(dir + "/metrics.jsonl");
    std::map<int64_t, Json> by_step;
    std::vector<double> window;
    for (std::string line; std::getline(m, line);) {
      if (line.empty()) continue;
      const Json j = Json::parse(line);
      const int64_t step = j.value("step", int64_t{0});
      Json& p = by_step[step];
      p["config"] = c.label;
      p["step"] = step;
      if (j.value("type", "") == "train") {
        step_s.push_back(j.value("step_s", NAN));
        p["train_loss"] = j["loss"];
        window.push_back(j["loss"].get<double>());
        if (window.size() > 10) window.erase(window.begin());
        double avg = 0;
        for (double v : window) avg += v;
        p["train_loss_avg10"] = avg / static_cast<double>(window.size());
      } else if (j.value("type", "") == "eval") {
        p["val_loss"] = j["val_loss"];
      }
    }
    for (const auto& [_, p] : by_step) curves.add(p);
    // The first steps pay for first-touch allocations and thread start-up: not steady state.
    const size_t skip =
        std::min<size_t>(step_s.size() / 2, std::max<size_t>(2, step_s.size() / 10));
    const double step_med = median(
        std::vector<double>(step_s.begin() + static_cast<std::ptrdiff_t>(skip), step_s.end()));
    if (c.type == TrainType::kLora && ranks == 1) lora_step = step_med;
    row["first_val_loss"] = s["first_val_loss"];
    row["final_val_loss"] = s["final_val_loss"];
    row["best_val_loss"] = s["best_val_loss"];
    row["final_train_loss"] = s["final_train_loss"];
    row["step_ms"] = 1e3 * step_med;
    row["tokens_per_s"] = static_cast<double>(o.finetune_batch * o.finetune_seq_len) / step_med;
    row["step_ratio_vs_lora"] = step_med / lora_step;
    // Scaling efficiency against the same configuration on one rank: speed-up per core used.
    const double tps = row["tokens_per_s"].get<double>();
    if (ranks == 1) one_rank_tps[base_label] = tps;
    if (one_rank_tps.count(base_label)) {
      const double cores_1 = static_cast<double>(threads_per_rank(1));
      const double cores_n = static_cast<double>(ranks * threads_per_rank(ranks));
      row["dp_efficiency"] = tps / one_rank_tps[base_label] * cores_1 / cores_n;
    }
    const Json& dist = s.value("dist", Json::object());
    const double steps = std::max(1.0, s.value("steps", 1.0));
    row["allreduce_ms"] = 1e3 * dist.value("allreduce_seconds", 0.0) / steps;
    row["allreduce_mb"] = dist.value("allreduce_bytes_per_step", 0.0) / 1e6;
    const double padding = s["data"]["padding_fraction"].get<double>();
    row["packed"] = s["data"]["packed"];
    row["padding_pct"] = 100.0 * padding;
    row["real_tokens_per_s"] = row["tokens_per_s"].get<double>() * (1.0 - padding);
    row["peak_rss_mb"] = s["peak_rss_bytes"].get<double>() / 1e6;
    row["base_weight_mb"] = s["base_weight_bytes"].get<double>() / 1e6;
    row["linear_weight_mb"] = s["linear_weight_bytes"].get<double>() / 1e6;
    row["trainable_params"] = s["trainable_parameters"];
    row["total_params"] = s["total_parameters"];
    row["trainer_tokens_per_s"] = s["tokens_per_s"];
    row["status"] = "ok";
    spdlog::info("bench finetune: {}: val loss {} -> {}, {:.1f} ms/step, peak RSS {:.0f} MB",
                 c.label, s["first_val_loss"].dump(), s["final_val_loss"].dump(), 1e3 * step_med,
                 row["peak_rss_mb"].get<double>());
    table.add(row);
  }

  table.notes = {
      "Every configuration fine-tunes `" + fs::path(model_path).filename().string() + "` on `" +
          fs::path(data_path).filename().string() + "` (5% of its documents held out) for " +
          std::to_string(o.finetune_steps) + " steps of " + std::to_string(o.finetune_batch) +
          " x " + std::to_string(o.finetune_seq_len) +
          " tokens, same seed and data order, compute dtype " + o.finetune_dtype +
          "; LoRA/QLoRA use adapter `" + adapter->name() + "` on every projection at lr " +
          std::to_string(o.finetune_lr).substr(0, 6) + ", full fine-tuning lr " +
          std::to_string(o.finetune_full_lr).substr(0, 6) +
          " (full updates every weight, so it takes a smaller rate), on " +
          std::to_string(threads) +
          " thread(s) (`--finetune_threads`: at this size a step is hundreds of tiny ops, and "
          "on our 2-core VM two threads were slower and varied by 40% between runs). Each "
          "runs in its own process: *peak_rss_mb* is that process's peak resident memory.",
      "*step_ms* is the median optimizer step after the first " +
          std::string("steps (evaluation excluded); *tokens_per_s* = batch x seq_len / step; ") +
          "*padding_pct* is the share of the training split's input positions that hold padding "
          "(records shorter than seq_len; `--finetune_pack` fills them with further records), "
          "*real_tokens_per_s* = tokens_per_s x (1 - padding). "
          "*step_ratio_vs_lora* = step / the LoRA step of this run (the QLoRA overhead at "
          "stories260K's size, where per-call overheads, not matmuls, dominate; see scale for "
          "larger models). *base_weight_mb* counts every base weight the model holds "
          "(projections quantized or not, embeddings, norms; adapters excluded).",
      "With `--finetune_ranks`, a configuration also runs data-parallel on N ranks (c10d "
          "Gloo on this machine, started as torchrun would): the same global batch (batch / N "
          "rows per rank) and threads / N threads per rank; *dp_efficiency* = (tokens/s on N "
          "ranks / tokens/s on one) x (cores on one / cores on N); *allreduce_ms* and "
          "*allreduce_mb* are the gradient all-reduce time and bytes per step (rank 0).",
  };

  BenchResult result;
  result.command = "finetune";
  {
    std::ostringstream gp;
    gp << gp_preamble("finetune_loss.png", 1200, 560);
    std::vector<std::string> ok_labels;
    for (size_t r = 0; r < table.rows().size(); ++r)
      if (table.at(r, "status") == "ok")
        ok_labels.push_back(table.at(r, "config").get<std::string>());
    for (size_t i = 0; i < ok_labels.size(); ++i) {
      gp << gp_datablock("c" + std::to_string(i), curves, {"step", "train_loss_avg10", "val_loss"},
                         [&](size_t r) { return curves.at(r, "config") == ok_labels[i]; });
    }
    gp << "set multiplot layout 1,2 title "
       << gp_quote("Fine-tuning " + fs::path(model_path).stem().string() + " on " +
                   fs::path(data_path).filename().string())
       << "\nset xlabel 'step'\nset key top right font ',8'\n"
       << "set title 'train loss (mean of the last 10 steps)'\nset ylabel 'loss'\nplot ";
    for (size_t i = 0; i < ok_labels.size(); ++i)
      gp << (i ? ", \\\n     " : "") << "$c" << i << " using 1:2 with lines " << line_style(i)
         << " lw 1.5 title " << gp_quote(ok_labels[i]);
    if (ok_labels.empty()) gp << "NaN notitle";
    gp << "\nset title 'held-out loss'\nset ylabel 'val loss'\nset datafile missing 'NaN'\nplot ";
    for (size_t i = 0; i < ok_labels.size(); ++i)
      gp << (i ? ", \\\n     " : "") << "$c" << i << " using 1:3 with linespoints " << line_style(i)
         << " pt 7 ps 0.6 lw 1.5 title " << gp_quote(ok_labels[i]);
    if (ok_labels.empty()) gp << "NaN notitle";
    gp << "\nunset multiplot\n";
    result.plots.push_back({"finetune_loss", "loss curves per configuration", gp.str()});
  }
  result.tables.push_back(std::move(table));
  result.tables.push_back(std::move(curves));
  result.seconds = seconds_since(t_start);
  return result;
}

namespace bench_detail {

int finetune_child(const std::string& recipe_path, const Registry& registry) {
  const Json recipe = read_json_file(recipe_path);
  Trainer trainer(resolve_recipe(recipe, registry));
  trainer.run();
  return 0;
}

// ---------------------------------------------------------------------------------------------
// scale

int scale_child(const std::string& spec_path, const std::string& result_path,
                const Registry& registry) {
  const int64_t rss_start = current_rss_bytes();
  const Json s = read_json_file(spec_path);
  const int threads = apply_threads(s.at("threads").get<int>());
  const torch::Device device(s.at("device").get<std::string>());
  const ModelConfig config = ModelConfig::from_hf_json(s.at("config"), spec_path);
  TuningSpec spec = TuningSpec::for_training(
      parse_train_type(s.at("train_type").get<std::string>()),
      parse_dtype(s.at("dtype").get<std::string>(), "dtype"), registry,
      s.value("quant", std::string()), s.value("quant_options", Json::object()), false,
      s.at("adapter").get<std::string>(), s.at("adapter_options"), {"all-linear"});

  // Several ranks (started as torchrun would by __scale_ranks): each trains on its own batch,
  // the adapters' gradients are all-reduced, and a qlora base may be sharded over the ranks.
  const DistConfig dist;
  const WorldInfo world = world_from_environment(current_environment(), dist);
  std::shared_ptr<ProcessGroup> group =
      world.world_size > 1 ? ProcessGroup::join(world, dist, "cpu") : ProcessGroup::single();
  if (s.value("shard_base", false) && spec.quantized_base() && group->world_size() > 1)
    spec.base.shards = std::make_shared<BaseShards>(group, spec.base.quant);

  const uint64_t seed = s.at("seed").get<uint64_t>();
  torch::manual_seed(seed);
  // The real loading path: a memory-mapped safetensors checkpoint, converted or quantized matrix
  // by matrix as the model is built, the mapping dropped afterwards (as the trainer does).
  auto t0 = clock_type::now();
  ModelFiles files = open_model(s.at("model_dir").get<std::string>());
  LlamaForCausalLM model(config, *files.weights, spec);
  files.weights.reset();
  model->to(device);
  model->set_activation_checkpointing(s.value("checkpointing", false));
  const double build_s = seconds_since(t0);
  // The model returns what its build freed (core/src/process.cpp), so this RSS is what the built
  // model holds; the build's own peak is reported beside it, and the peak counter restarts so
  // that train_peak is the training phase alone. (The current RSS first: a peak read after it
  // cannot be below it.)
  const int64_t rss_built = current_rss_bytes();
  const int64_t build_peak = peak_rss_bytes();
  const bool hwm_reset = reset_peak_rss();

  std::vector<torch::Tensor> params;
  for (auto& [_, p] : model->trainable_parameters()) params.push_back(p);
  std::unique_ptr<OptimizerShards> zero;
  if (s.value("shard_optimizer", false) && group->world_size() > 1)
    zero = std::make_unique<OptimizerShards>(params, group->rank(), group->world_size());
  torch::optim::AdamW opt(zero ? zero->owned() : params, torch::optim::AdamWOptions(1e-4));
  GradientBuckets buckets(params, int64_t{25} << 20);
  const int64_t batch = s.at("batch").get<int64_t>(), seq = s.at("seq_len").get<int64_t>();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1 + group->rank());
  torch::Tensor ids = torch::randint(config.vocab_size, {batch, seq + 1}, gen, torch::kLong);
  torch::Tensor tokens = ids.narrow(1, 0, seq).contiguous().to(device);
  torch::Tensor targets = ids.narrow(1, 1, seq).contiguous().to(device);
  model->train();
  const int64_t warm = std::max<int64_t>(0, s.at("warmup").get<int64_t>());
  const int64_t asked = s.at("steps").get<int64_t>();
  int64_t steps = asked;
  std::vector<double> times;
  double last_loss = NAN;
  CpuBlockCacheStats cache_at_timed;  // core's block cache when the timed steps start
  for (int64_t i = 0; i < warm + steps; ++i) {
    if (i == warm) cache_at_timed = cpu_block_cache_stats();
    t0 = clock_type::now();
    opt.zero_grad();
    if (zero) zero->zero_others_grad();
    auto [loss, n] = model->loss(tokens, targets);
    loss.backward();
    buckets.all_reduce(*group);
    if (spec.base.shards) spec.base.shards->release_all();
    opt.step();
    if (zero) zero->share_parameters(*group);
    sync(device);
    last_loss = loss.item<double>();
    const double dt = seconds_since(t0);
    if (i >= warm) times.push_back(dt);
    // Small models get more timed steps (about kScaleStepBudgetS of them, at most 5x the number
    // asked): they are cheap, and their medians are the noisiest.
    if (i == warm - 1) {
      steps = std::clamp<int64_t>(static_cast<int64_t>(kScaleStepBudgetS / std::max(dt, 1e-3)),
                                  asked, 5 * asked);
      // Every rank must take as many steps as the others (each is a collective): rank 0's count.
      if (group->world_size() > 1) {
        torch::Tensor n = torch::tensor({group->is_main() ? steps : int64_t{0}}, torch::kLong);
        group->all_reduce_sum(n, "the bench's timed step count");
        steps = n.item<int64_t>();
      }
    }
  }
  const CpuBlockCacheStats cache = cpu_block_cache_stats();
  const Json result = {
      {"build_s", build_s},
      {"block_cache",  // core's large-block cache (process.h): the timed steps' requests, and
                       // the most it mapped in the whole run
       {{"enabled", cache.enabled},
        {"hits", cache.hits - cache_at_timed.hits},
        {"misses", cache.misses - cache_at_timed.misses},
        {"evictions", cache.evictions - cache_at_timed.evictions},
        {"peak_mapped_bytes", cache.peak_mapped_bytes}}},
      {"rss_start_bytes", rss_start},
      {"rss_built_bytes", rss_built},
      {"build_peak_bytes", build_peak},
      {"train_peak_bytes", hwm_reset ? Json(peak_rss_bytes()) : Json(nullptr)},
      {"peak_rss_bytes", std::max(build_peak, peak_rss_bytes())},
      {"step_s", median(times)},
      {"step_times", times},
      {"steps", static_cast<int64_t>(times.size())},
      {"loss", last_loss},
      {"base_weight_bytes", model->base_weight_bytes()},
      {"linear_weight_bytes", model->linear_weight_bytes()},
      {"trainable_parameters", model->num_trainable_parameters()},
      {"total_parameters", model->num_total_parameters()},
      {"threads", threads},
      {"ranks", group->world_size()},
      {"gather_seconds", group->gather_seconds()},
      {"allreduce_seconds", group->reduce_seconds()},
      {"shard_base", spec.base.shards ? spec.base.shards->stats() : Json(nullptr)},
  };
  // Rank 0 writes RESULT.json, rank r RESULT.json.rank<r>.
  atomic_write_string(group->rank() == 0 ? result_path
                                         : result_path + ".rank" + std::to_string(group->rank()),
                      result.dump(2) + "\n");
  group->finish();
  return 0;
}

int synthesize_child(const std::string& spec_path) {
  const Json s = read_json_file(spec_path);
  apply_threads(s.at("threads").get<int>());
  const ModelConfig config = ModelConfig::from_hf_json(s.at("config"), spec_path);
  auto weights = random_weights(config, s.at("seed").get<uint64_t>());
  save_hf_model(s.at("model_dir").get<std::string>(), config, *weights,
                parse_dtype(s.at("dtype").get<std::string>(), "dtype"));
  return 0;
}

}  // namespace bench_detail

BenchResult bench_scale(const BenchOptions& o, const Registry& registry) {
  const auto t_start = clock_type::now();
  const int threads = apply_threads(o.threads);
  QTUNE_CHECK(!o.self_exe.empty(), "bench: the path of qtune-bench itself is unknown");
  QTUNE_CHECK(o.scale_steps > 0, "--scale_steps must be > 0, got ", o.scale_steps);
  QTUNE_CHECK(o.scale_batch > 0 && o.scale_seq_len > 0,
              "--scale_batch and --scale_seq_len must be > 0");
  QTUNE_CHECK(o.scale_ranks >= 1 && o.scale_ranks <= std::max(1, threads),
              "--scale_ranks must be in [1, the threads (", threads, ")], got ", o.scale_ranks);
  QTUNE_CHECK(!o.scale_shard_base || o.scale_ranks > 1,
              "--scale_shard_base needs --scale_ranks > 1");
  QTUNE_CHECK(!o.scale_shard_optimizer || o.scale_ranks > 1,
              "--scale_shard_optimizer needs --scale_ranks > 1");
  auto label_of = [&o](const auto& c) {
    std::string l = c.label;
    if (o.scale_ranks > 1) l += " x" + std::to_string(o.scale_ranks) + " ranks";
    if (o.scale_shard_base && c.type == TrainType::kQlora) l += " sharded";
    if (o.scale_shard_optimizer) l += " ZeRO-1";
    return l;
  };
  auto adapter = pick_adapter(o, registry);
  adapter->check_options(o.adapter_options, "--adapter_options");
  std::vector<ModelConfig> configs;
  for (const auto& n : o.scale_sizes) {
    configs.push_back(synthetic_config(n, "--scale_sizes"));
    QTUNE_CHECK(o.scale_seq_len <= configs.back().max_position_embeddings, "--scale_seq_len ",
                o.scale_seq_len, " exceeds size ", n, "'s max_position_embeddings ",
                configs.back().max_position_embeddings);
  }
  for (const auto& d : o.scale_dtypes) parse_dtype(d, "--scale_dtypes");
  // One set per backend unless the user named them: the sweep's cost grows with the model.
  std::vector<QuantSet> sets = o.scale_sets;
  if (sets.empty()) {
    std::vector<std::string> seen;
    for (const auto& s : o.quant_sets)
      if (std::find(seen.begin(), seen.end(), s.backend) == seen.end()) {
        seen.push_back(s.backend);
        sets.push_back(s);
      }
  }
  const auto runs = run_configs(false, sets);
  WorkDir work(o);

  BenchTable table("scale", "LoRA vs QLoRA on synthetic Llama models of growing size",
                   {{"size", 4, true},
                    {"params_m", 4, true},
                    {"hidden", 4, false},
                    {"layers", 4, false},
                    {"intermediate", 4, false},
                    {"dtype", 4, true},
                    {"config", 4, true},
                    {"train_type", 4, false},
                    {"backend", 4, false},
                    {"batch", 4, false},
                    {"seq_len", 4, false},
                    {"steps", 4, false},
                    {"checkpointing", 4, true},
                    {"ranks", 4, o.scale_ranks > 1},
                    {"shard_base", 4, o.scale_shard_base},
                    {"shard_optimizer", 4, o.scale_shard_optimizer},
                    {"build_s", 3, true},
                    {"rss_start_mb", 4, false},
                    {"build_peak_mb", 4, true},
                    {"rss_built_mb", 4, true},
                    {"train_peak_mb", 4, true},
                    {"peak_rss_mb", 4, false},
                    {"base_weight_mb", 4, true},
                    {"linear_weight_mb", 4, false},
                    {"step_ms", 4, true},
                    {"tokens_per_s", 4, false},
                    {"step_ratio_vs_lora", 3, true},
                    {"rank_base_weight_mb", 4, o.scale_shard_base},
                    {"gather_s_per_step", 3, o.scale_shard_base},
                    {"trainable_params", 4, false},
                    {"threads", 4, false},
                    {"status", 4, true},
                    {"options", 4, false}});

  // A dense base that cannot fit is not started: the OOM killer would take the child (or the
  // machine's other work) minutes into its build, as LoRA fp32 at 7B did (27 GB of weights).
  const double memory_bytes = machine_memory_bytes();
  size_t index = 0;
  for (const auto& dtype : o.scale_dtypes) {
    for (size_t ci = 0; ci < configs.size(); ++ci) {
      const auto& cfg = configs[ci];
      double lora_step = NAN;
      const std::string model_dir = synthetic_model(o, work.path(), o.scale_sizes[ci], threads);
      for (const auto& c : runs) {
        const bool sharded = o.scale_shard_base && c.type == TrainType::kQlora;
        const std::string label = label_of(c);
        Json row = {{"size", o.scale_sizes[ci]},
                    {"params_m", cfg.num_parameters() / 1e6},
                    {"hidden", cfg.hidden_size},
                    {"layers", cfg.num_hidden_layers},
                    {"intermediate", cfg.intermediate_size},
                    {"dtype", dtype},
                    {"config", label},
                    {"train_type", to_string(c.type)},
                    {"backend", c.set ? c.set->backend : ""},
                    {"batch", o.scale_batch},
                    {"seq_len", o.scale_seq_len},
                    {"steps", o.scale_steps},
                    {"checkpointing", o.scale_checkpointing},
                    {"ranks", o.scale_ranks},
                    {"shard_base", sharded},
                    {"shard_optimizer", o.scale_shard_optimizer},
                    {"threads", threads},
                    {"options", c.set ? c.set->options.dump() : ""}};
        const std::string dir = work.path() + "/scale_" + std::to_string(index++) + "_" +
                                slug(o.scale_sizes[ci] + "_" + dtype + "_" + label);
        const double dense_bytes = static_cast<double>(cfg.num_parameters()) *
                                   (dtype == "fp32" ? 4.0 : 2.0);
        if (c.type != TrainType::kQlora && memory_bytes > 0 && dense_bytes > memory_bytes) {
          row["status"] = fmt::format(
              "skipped: its dense base alone ({:.1f} GB in {}) exceeds this machine's memory "
              "({:.1f} GB)",
              dense_bytes / 1e9, dtype, memory_bytes / 1e9);
          spdlog::warn("bench scale: {} {} {}: {}", o.scale_sizes[ci], dtype, label,
                       row["status"].get<std::string>());
          table.add(row);
          continue;
        }
        fs::create_directories(dir);
        const Json spec = {{"config", cfg.to_hf_json()},
                           {"model_dir", model_dir},
                           {"train_type", to_string(c.type)},
                           {"dtype", dtype},
                           {"quant", c.set ? c.set->backend : ""},
                           {"quant_options", c.set ? c.set->options : Json::object()},
                           {"adapter", adapter->name()},
                           {"adapter_options", o.adapter_options},
                           {"batch", o.scale_batch},
                           {"seq_len", o.scale_seq_len},
                           {"steps", o.scale_steps},
                           {"checkpointing", o.scale_checkpointing},
                           {"warmup", o.warmup},
                           {"threads", std::max<int64_t>(1, threads / o.scale_ranks)},
                           {"shard_base", sharded},
                           {"shard_optimizer", o.scale_shard_optimizer},
                           {"seed", static_cast<int64_t>(o.seed)},
                           {"device", o.device.str()}};
        atomic_write_string(dir + "/spec.json", spec.dump(2) + "\n");
        const std::string log = dir + "/log.txt";
        spdlog::info("bench scale: {} {} {}", o.scale_sizes[ci], dtype, label);
        const int rc =
            o.scale_ranks > 1
                ? run_child(o.self_exe,
                            {"__scale_ranks", std::to_string(o.scale_ranks), dir + "/spec.json",
                             dir + "/result.json"},
                            log)
                : run_child(o.self_exe, {"__scale", dir + "/spec.json", dir + "/result.json"}, log);
        if (rc != 0) {
          row["status"] = child_status(rc, log);
          spdlog::warn("bench scale: {} {} {}: {}", o.scale_sizes[ci], dtype, label,
                       row["status"].get<std::string>());
          table.add(row);
          continue;
        }
        Json r = read_json_file(dir + "/result.json");
        // Several ranks: the memory columns are the largest rank's.
        for (int64_t k = 1; k < o.scale_ranks; ++k) {
          const Json rk = read_json_file(dir + "/result.json.rank" + std::to_string(k));
          for (const char* key : {"build_peak_bytes", "rss_built_bytes", "peak_rss_bytes",
                                  "train_peak_bytes", "rss_start_bytes"})
            if (!rk[key].is_null() && !r[key].is_null() && rk[key] > r[key]) r[key] = rk[key];
        }
        const double step = r["step_s"].get<double>();
        if (c.type == TrainType::kLora) lora_step = step;
        row["build_s"] = r["build_s"];
        row["steps"] = r["steps"];
        row["rss_start_mb"] = r["rss_start_bytes"].get<double>() / 1e6;
        row["rss_built_mb"] = r["rss_built_bytes"].get<double>() / 1e6;
        row["build_peak_mb"] = r["build_peak_bytes"].get<double>() / 1e6;
        if (!r["train_peak_bytes"].is_null())
          row["train_peak_mb"] = r["train_peak_bytes"].get<double>() / 1e6;
        row["peak_rss_mb"] = r["peak_rss_bytes"].get<double>() / 1e6;
        row["base_weight_mb"] = r["base_weight_bytes"].get<double>() / 1e6;
        row["linear_weight_mb"] = r["linear_weight_bytes"].get<double>() / 1e6;
        row["step_ms"] = 1e3 * step;
        row["tokens_per_s"] = static_cast<double>(o.scale_batch * o.scale_seq_len) / step;
        row["step_ratio_vs_lora"] = step / lora_step;
        row["trainable_params"] = r["trainable_parameters"];
        if (sharded) {
          const Json& st = r["shard_base"];
          row["base_weight_mb"] = (r["base_weight_bytes"].get<double>() -
                                   st["shard_bytes"].get<double>() +
                                   st["full_bytes"].get<double>()) / 1e6;
          row["rank_base_weight_mb"] = r["base_weight_bytes"].get<double>() / 1e6;
          row["gather_s_per_step"] =
              r["gather_seconds"].get<double>() /
              static_cast<double>(o.warmup + r["steps"].get<int64_t>());
        }
        row["status"] = "ok";
        spdlog::info(
            "bench scale: {} {} {}: built {:.0f} MB, training peak {} MB, step {:.0f} ms "
            "(x{:.2f} LoRA)",
            o.scale_sizes[ci], dtype, label, row["rss_built_mb"].get<double>(),
            row["train_peak_mb"].dump(), 1e3 * step, step / lora_step);
        table.add(row);
      }
    }
  }

  // Least-squares slope of peak RSS and of base bytes over parameters, per series: the memory a
  // parameter costs under each configuration.
  BenchTable slope("scale_slope", "Memory per parameter (least-squares slope over sizes)",
                   {{"dtype", 4, true},
                    {"config", 4, true},
                    {"sizes", 4, true},
                    {"train_peak_bytes_per_param", 3, true},
                    {"train_peak_intercept_mb", 4, true},
                    {"build_peak_bytes_per_param", 3, true},
                    {"base_bytes_per_param", 3, true}});
  std::vector<std::pair<std::string, std::string>> series;
  for (const auto& d : o.scale_dtypes)
    for (const auto& c : runs) series.emplace_back(d, label_of(c));
  for (const auto& [d, label] : series) {
    std::vector<double> x, y, b, bp;
    for (size_t r = 0; r < table.rows().size(); ++r) {
      if (table.at(r, "status") != "ok" || table.at(r, "dtype") != d ||
          table.at(r, "config") != label || table.at(r, "train_peak_mb").is_null())
        continue;
      x.push_back(table.at(r, "params_m").get<double>() * 1e6);
      y.push_back(table.at(r, "train_peak_mb").get<double>() * 1e6);
      b.push_back(table.at(r, "base_weight_mb").get<double>() * 1e6);
      bp.push_back(table.at(r, "build_peak_mb").get<double>() * 1e6);
    }
    Json row = {{"dtype", d}, {"config", label}, {"sizes", static_cast<int64_t>(x.size())}};
    if (x.size() >= 2) {
      auto fit = [&](const std::vector<double>& v) {
        double mx = 0, my = 0;
        for (size_t i = 0; i < x.size(); ++i) mx += x[i], my += v[i];
        mx /= x.size();
        my /= x.size();
        double sxy = 0, sxx = 0;
        for (size_t i = 0; i < x.size(); ++i)
          sxy += (x[i] - mx) * (v[i] - my), sxx += (x[i] - mx) * (x[i] - mx);
        const double k = sxx > 0 ? sxy / sxx : NAN;
        return std::make_pair(k, my - k * mx);
      };
      const auto [k, c0] = fit(y);
      row["train_peak_bytes_per_param"] = k;
      row["train_peak_intercept_mb"] = c0 / 1e6;
      row["build_peak_bytes_per_param"] = fit(bp).first;
      row["base_bytes_per_param"] = fit(b).first;
    }
    slope.add(row);
  }

  table.notes = {
      "Random weights (normal, std 0.02) written once per size as a bf16 safetensors checkpoint "
      "and loaded the way the trainer loads a model (memory-mapped, converted or quantized matrix "
      "by matrix), in Llama shapes with a 32000-token vocabulary: 15M is "
      "llama2.c's stories15M, 1B is TinyLlama-1.1B's shape (GQA 32/4 heads, untied head), 60M "
      "and 250M sit between. Adapter `" +
          adapter->name() +
          "` on every projection; QLoRA quantizes every frozen linear including the head. " +
          "Each configuration is a fresh process (*rss_start_mb*, in the CSV, is LibTorch and the "
          "plugins before anything is built). *build_peak_mb*: peak RSS while building the model "
          "(each matrix is read from the mapping, then kept in the compute dtype or quantized from "
          "an fp32 copy; its mapped pages are released once read). *rss_built_mb*: RSS once built, "
          "after returning the build's freed "
          "memory to the system: what the model holds. *train_peak_mb*: peak RSS of "
          "the training steps alone (peak counter restarted after building): model, adapters, "
          "AdamW state, activations. *peak_rss_mb* (CSV) is the whole process's peak. "
          "*step_ms*: median of at least " +
          std::to_string(o.scale_steps) +
          " optimizer steps (*steps*: more for small models, about 3 s of them) of " +
          std::to_string(o.scale_batch) + " x " + std::to_string(o.scale_seq_len) +
          " tokens " +
          (o.warmup > 0 ? "after " + std::to_string(o.warmup) + " warm-up step(s)"
                        : std::string("with no warm-up step (so the time includes faulting in "
                                      "the step's memory)")) +
          "; *step_ratio_vs_lora* is the QLoRA / LoRA step time at the same "
          "size and compute dtype in the same run.",
  };
  if (o.scale_ranks > 1)
    table.notes.push_back(
        std::to_string(o.scale_ranks) + " ranks per configuration (c10d Gloo on loopback, "
        "started as torchrun would), each with its own " + std::to_string(o.scale_batch) +
        " x " + std::to_string(o.scale_seq_len) + " tokens and " +
        std::to_string(std::max<int64_t>(1, threads / o.scale_ranks)) +
        " thread(s); the adapters' gradients are all-reduced every step. Memory columns are the "
        "largest rank's; *step_ms* is rank 0's." +
        (o.scale_shard_base
             ? std::string(" *sharded*: the qlora base is sharded over the ranks "
                           "(dist.shard_base): *base_weight_mb* is the whole base, "
                           "*rank_base_weight_mb* what one rank holds, *gather_s_per_step* the "
                           "seconds a step waited for layer gathers.")
             : std::string()) +
        (o.scale_shard_optimizer
             ? std::string(" *ZeRO-1*: AdamW's moments are spread over the ranks "
                           "(dist.shard_optimizer), each updated parameter sent from its owner.")
             : std::string()));
  slope.notes = {
      "*train_peak_bytes_per_param*: the least-squares slope of the training peak RSS against "
      "parameter count across sizes, i.e. what one more parameter costs while training (a bf16 "
      "model holds 2 bytes per parameter, fp32 4); *build_peak_bytes_per_param* the same for the "
      "build's peak, *base_bytes_per_param* for the base weights the model holds.",
  };

  BenchResult result;
  result.command = "scale";
  {
    std::ostringstream mem, step;
    // The log axis spans the sizes run, with a little room on each side.
    double xmin_m = 1e30, xmax_m = 0;
    for (const auto& c : configs) {
      xmin_m = std::min(xmin_m, c.num_parameters() / 1e6);
      xmax_m = std::max(xmax_m, c.num_parameters() / 1e6);
    }
    xmin_m = configs.empty() ? 1 : xmin_m / 1.5;
    xmax_m = configs.empty() ? 10 : xmax_m * 1.5;
    mem << gp_preamble("scale_memory.png", 1000, 620);
    step << gp_preamble("scale_step.png", 1200, 540);
    std::vector<std::string> names;
    for (size_t i = 0; i < series.size(); ++i) {
      const auto& [d, label] = series[i];
      auto keep = [&](size_t r) {
        return table.at(r, "status") == "ok" && table.at(r, "dtype") == d &&
               table.at(r, "config") == label;
      };
      const std::string block = gp_datablock("s" + std::to_string(i), table,
                                             {"params_m", "train_peak_mb", "base_weight_mb",
                                              "step_ms", "step_ratio_vs_lora", "build_peak_mb"},
                                             keep);
      mem << block;
      step << block;
      names.push_back(o.scale_dtypes.size() > 1 ? label + " " + d : label);
    }
    mem << "set title 'Training peak RSS (solid), build peak (dotted) and base weights (dashed), "
        << o.scale_batch << " x " << o.scale_seq_len << " tokens per step'\n"
        << "set xlabel 'parameters (millions)'\nset ylabel 'MB'\n"
        << "set key top left box opaque\nset xrange [0:*]\nset yrange [0:*]\nplot ";
    for (size_t i = 0; i < names.size(); ++i)
      mem << (i ? ", \\\n     " : "") << "$s" << i << " using 1:2 with linespoints lt " << i + 1
          << " pt 7 lw 2 title " << gp_quote(names[i] + ": training peak RSS") << ", $s" << i
          << " using 1:6 with lines lt " << i + 1 << " dt 3 lw 1.5 notitle, $s" << i
          << " using 1:3 with lines lt " << i + 1 << " dt 2 lw 1.5 notitle";
    if (names.empty()) mem << "NaN notitle";
    mem << "\n";
    step << "set multiplot layout 1,2 title 'Step time vs model size'\n"
         << "set xlabel 'parameters (millions, log)'\nset logscale x\nset key top left\n"
         << "set xrange [" << xmin_m << ":" << xmax_m << "]\n"
         << "set title 'optimizer step (ms, log)'\nset logscale y\nplot ";
    for (size_t i = 0; i < names.size(); ++i)
      step << (i ? ", \\\n     " : "") << "$s" << i << " using 1:4 with linespoints lt " << i + 1
           << " pt 7 lw 2 title " << gp_quote(names[i]);
    if (names.empty()) step << "NaN notitle";
    step << "\nset title 'QLoRA step / LoRA step'\nunset logscale y\nset yrange [0:*]\nplot ";
    bool any = false;
    for (size_t i = 0; i < names.size(); ++i) {
      if (runs[i % runs.size()].type == TrainType::kLora) continue;
      step << (any ? ", \\\n     " : "") << "$s" << i << " using 1:5 with linespoints lt " << i + 1
           << " pt 7 lw 2 title " << gp_quote(names[i]);
      any = true;
    }
    step << (any ? ", \\\n     " : "") << "1 with lines dt 2 lc rgb 'black' notitle, 1.15 with "
         << "lines dt 3 lc rgb 'red' title '+15%'\nunset multiplot\n";
    result.plots.push_back({"scale_memory", "peak RSS vs model size", mem.str()});
    result.plots.push_back({"scale_step", "step time vs model size", step.str()});
  }
  result.tables.push_back(std::move(table));
  result.tables.push_back(std::move(slope));
  result.seconds = seconds_since(t_start);
  return result;
}

}  // namespace qtune
