// The training recipe (see train.h).
#include "qtune/train.h"

#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <thread>

#include "qtune/atomic_file.h"
#include "qtune/checkpoint.h"
#include "qtune/data.h"
#include "qtune/data_shard.h"
#include "qtune/error.h"
#include "qtune/files.h"
#include "qtune/model_files.h"
#include "qtune/peft.h"
#include "qtune/process_group.h"
#include "qtune/recipe.h"
#include "qtune/tokenizer.h"

namespace fs = std::filesystem;

namespace qtune {

namespace {
std::atomic<bool> g_stop{false};
}

void Trainer::request_stop() { g_stop.store(true); }

int64_t peak_rss_bytes() {
  // VmHWM belongs to this process image. getrusage's ru_maxrss survives exec on Linux, so a
  // trainer started by a large process (a benchmark driver, a notebook) would report its
  // parent's peak; it is only the fallback where /proc is missing.
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::atoll(line.c_str() + 6) * 1024;  // kB
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

double lr_at(int64_t step, int64_t total, int64_t warmup, double lr, double min_ratio) {
  if (warmup > 0 && step <= warmup) return lr * static_cast<double>(step) / warmup;
  if (total <= warmup) return lr;
  const double progress =
      std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(total - warmup));
  return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + std::cos(M_PI * progress)));
}

// ---------------------------------------------------------------------------------------------
// Resolving a recipe

ResolvedRecipe resolve_recipe(const Json& recipe, const Registry& registry) {
  validate_recipe(recipe);
  ResolvedRecipe r;
  r.recipe = recipe;
  r.spec.train_type = parse_train_type(recipe.at("train_type").get<std::string>());
  r.spec.dtype = parse_dtype(recipe.at("dtype").get<std::string>(), "dtype");

  r.model_path = resolve_data_path(recipe["model"]["path"].get<std::string>(), "model.path");
  const std::string tok = recipe["model"]["tokenizer"].get<std::string>();
  if (!tok.empty()) r.tokenizer_path = resolve_data_path(tok, "model.tokenizer");
  r.data_path = resolve_data_path(recipe["data"]["path"].get<std::string>(), "data.path");
  const std::string val = recipe["data"]["val_path"].get<std::string>();
  if (!val.empty()) r.val_path = resolve_data_path(val, "data.val_path");

  if (r.spec.train_type == TrainType::kQlora) {
    r.spec.quant = registry.quant(recipe["quant"]["name"].get<std::string>());
    r.spec.quant_options =
        resolve_options(r.spec.quant->option_schema(), recipe["quant"]["options"], "quant.options");
    r.spec.quant_skip_output = recipe["quant"]["skip_output"].get<bool>();
    r.recipe["quant"]["options"] = r.spec.quant_options;
  }
  if (r.spec.train_type != TrainType::kFull) {
    r.spec.adapter = registry.adapter(recipe["adapter"]["name"].get<std::string>());
    r.spec.adapter_options = resolve_options(r.spec.adapter->option_schema(),
                                             recipe["adapter"]["options"], "adapter.options");
    r.recipe["adapter"]["options"] = r.spec.adapter_options;
    r.spec.target_modules =
        parse_target_modules(recipe["adapter"]["target_modules"].get<std::vector<std::string>>(),
                             "adapter.target_modules");
  }
  return r;
}

LlamaForCausalLM build_model(const ResolvedRecipe& r) {
  ModelFiles files = open_model(r.model_path);
  return LlamaForCausalLM(files.config, *files.weights, r.spec);
}

// ---------------------------------------------------------------------------------------------
// Progress and metrics

namespace {

std::string fmt_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", static_cast<long long>(t / 3600),
                  static_cast<long long>(t / 60 % 60), static_cast<long long>(t % 60));
  else
    std::snprintf(buf, sizeof buf, "%02lld:%02lld", static_cast<long long>(t / 60),
                  static_cast<long long>(t % 60));
  return buf;
}

class Progress {
 public:
  explicit Progress(int64_t total) : total_(total), tty_(isatty(STDERR_FILENO)) {}
  void update(int64_t step, double loss, double tok_s, double eta_s) {
    if (!tty_) return;
    const int width = 24;
    const int filled = static_cast<int>(width * step / std::max<int64_t>(1, total_));
    std::string bar(filled, '#');
    bar += std::string(width - filled, '.');
    std::fprintf(stderr, "\r[%s] %lld/%lld loss %.4f  %.0f tok/s  ETA %s   ", bar.c_str(),
                 static_cast<long long>(step), static_cast<long long>(total_), loss, tok_s,
                 fmt_duration(eta_s).c_str());
    std::fflush(stderr);
  }
  void finish() {
    if (tty_) std::fprintf(stderr, "\n");
  }
  bool tty() const { return tty_; }

 private:
  int64_t total_;
  bool tty_;
};

struct EvalResult {
  double loss = NAN;
  int64_t tokens = 0;
};

// Each rank evaluates its rows of the global eval batches; the sums of losses and target counts
// are reduced, so every rank gets the one-process value.
EvalResult evaluate(LlamaForCausalLMImpl& model, const TokenDataset& data, int64_t batch_size,
                    int64_t max_batches, ProcessGroup& group) {
  torch::NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  double sum = 0;
  int64_t count = 0;
  for_each_eval_share(data, batch_size, group.rank(), group.world_size(), max_batches,
                      [&](const Batch& b) {
                        if (b.num_targets == 0) return;
                        auto [loss, n] = model.loss(b.tokens, b.targets);
                        sum += loss.item<double>() * static_cast<double>(n);
                        count += n;
                      });
  model.train(was_training);
  if (group.world_size() > 1) {
    auto totals = torch::tensor({sum, static_cast<double>(count)}, torch::kFloat64);
    group.all_reduce_sum(totals, "the evaluation");
    sum = totals[0].item<double>();
    count = static_cast<int64_t>(totals[1].item<double>());
  }
  return {count ? sum / static_cast<double>(count) : NAN, count};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Resume helpers

namespace {

// Keeps the metrics records up to `step` (a resumed run redoes the steps after it; a record cut
// short by a kill is dropped too) so metrics.jsonl reads as one run.
void trim_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in.good()) return;
  std::string kept, line;
  while (std::getline(in, line)) {
    try {
      Json j = Json::parse(line);
      if (j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() > step)
        continue;
      kept += line + "\n";
    } catch (const Json::exception&) {
    }
  }
  in.close();
  atomic_write_string(path, kept);
}

void flatten(const Json& j, const std::string& prefix, std::map<std::string, Json>& out) {
  if (j.is_object() && !j.empty()) {
    for (const auto& [k, v] : j.items()) flatten(v, prefix.empty() ? k : prefix + "." + k, out);
  } else {
    out[prefix] = j;
  }
}

// Recipe keys that changed since the checkpoint, other than where things go. They are allowed
// (extending max_steps is the usual reason to resume a finished run) but change what the
// resumed steps compute, so the user hears about each.
std::vector<std::string> recipe_changes(const Json& before, const Json& now) {
  std::map<std::string, Json> a, b;
  flatten(before, "", a);
  flatten(now, "", b);
  std::vector<std::string> out;
  for (const auto& [k, v] : b) {
    if (k == "output_dir" || k == "resume" || k == "plugin_dir" || k == "log_every") continue;
    auto it = a.find(k);
    if (it == a.end() || it->second != v)
      out.push_back(k + " " + (it == a.end() ? std::string("(unset)") : it->second.dump()) +
                    " -> " + v.dump());
  }
  return out;
}

Json nan_to_null(double v) { return std::isnan(v) ? Json(nullptr) : Json(v); }
double null_to_nan(const Json& j, const char* key) {
  return j.contains(key) && j[key].is_number() ? j[key].get<double>() : NAN;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The loop

Trainer::Trainer(ResolvedRecipe recipe) : r_(std::move(recipe)) {}

bool Trainer::stop_requested() { return g_stop.load(); }

namespace {
Json run_steps(ResolvedRecipe& r_, const std::function<void(const Json&)>& on_metrics,
               ProcessGroup& group);
}

// The process group is part of the run set-up: joined from the launcher's environment (a world of
// one without a launcher) before anything is loaded, left after the outputs are written.
Json Trainer::run() {
  const DistConfig dist = dist_config_from_recipe(r_.recipe);
  const WorldInfo world = world_from_environment(current_environment(), dist);
  if (world.rank > 0)
    spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [rank " + std::to_string(world.rank) + "] [%l] %v");
  std::shared_ptr<ProcessGroup> group;
  try {
    group = world.world_size > 1 ? ProcessGroup::join(world, dist, "cpu") : ProcessGroup::single();
    Json summary = run_steps(r_, on_metrics, *group);
    group->finish();
    return summary;
  } catch (const std::exception& e) {
    if (group) group->announce_failure(e.what());
    if (world.rank > 0 && dynamic_cast<const UserError*>(&e))
      throw UserError("rank " + std::to_string(world.rank) + ": " + e.what());
    throw;
  }
}

namespace {

Json run_steps(ResolvedRecipe& r_, const std::function<void(const Json&)>& on_metrics,
               ProcessGroup& group) {
  using clock = std::chrono::steady_clock;
  const Json& rc = r_.recipe;
  const auto& t = rc["train"];
  g_stop.store(false);
  const bool main_rank = group.is_main();
  const int64_t world = group.world_size();

  // Local ranks share the cores.
  const int64_t threads = rc["threads"].get<int64_t>();
  const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  at::set_num_threads(static_cast<int>(
      threads > 0 ? threads : std::max<int64_t>(1, cores / group.world().local_world_size)));
  const uint64_t seed = rc["seed"].get<uint64_t>();
  torch::manual_seed(seed);

  const std::string out_dir = rc["output_dir"].get<std::string>();
  const std::string ckpt_root = (fs::path(out_dir) / "checkpoints").string();
  const int64_t max_steps = t["max_steps"].get<int64_t>();

  // A checkpoint to resume from is read (and its format checked) before anything is loaded.
  const std::string resume_spec = rc["resume"].get<std::string>();
  std::string resume_dir;
  CheckpointState resumed;
  if (!resume_spec.empty()) {
    resume_dir = resolve_checkpoint(resume_spec, ckpt_root);
    resumed = read_checkpoint_state(resume_dir);
    QTUNE_CHECK(resumed.step < max_steps, "resume: checkpoint ", resume_dir, " is at step ",
                resumed.step, ", which already reaches train.max_steps ", max_steps,
                "; raise --max_steps to train further");
    for (const auto& change : recipe_changes(resumed.recipe, rc))
      spdlog::warn("resume: recipe changed since the checkpoint: {}", change);
  }

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  QTUNE_CHECK(!ec, "output_dir: cannot create ", out_dir, ": ", ec.message());
  if (main_rank) atomic_write_string((fs::path(out_dir) / "recipe.json").string(), rc.dump(2) + "\n");

  // Model first (it may name its own tokenizer), then data.
  const auto t_load = clock::now();
  ModelFiles files = open_model(r_.model_path);
  std::string tok_path = r_.tokenizer_path.empty() ? files.tokenizer_path : r_.tokenizer_path;
  QTUNE_CHECK(!tok_path.empty(), "model.tokenizer: ", r_.model_path,
              " has no tokenizer beside it; set model.tokenizer (--tokenizer)");
  auto tokenizer = load_tokenizer(tok_path);
  QTUNE_CHECK(tokenizer->vocab_size() <= files.config.vocab_size, "model.tokenizer: ", tok_path,
              " has ", tokenizer->vocab_size(), " tokens but the model's vocabulary is ",
              files.config.vocab_size);
  if (r_.spec.train_type == TrainType::kQlora) {
    // A qtune-quantize directory is used as it was quantized: its options are the run's.
    const Json pq = prequantized_options(*files.weights);
    if (!pq.is_null()) {
      QTUNE_CHECK(pq["backend"] == r_.spec.quant->name(), "quant.name: ", r_.model_path,
                  " is quantized with ", pq["backend"].dump(), ", but quant.name is \"",
                  r_.spec.quant->name(), "\"");
      const Json opts =
          resolve_options(r_.spec.quant->option_schema(), pq["options"], r_.model_path);
      if (opts != r_.spec.quant_options) {
        spdlog::info("quant: {} was quantized with options {}; those apply (not {})", r_.model_path,
                     opts.dump(), r_.spec.quant_options.dump());
        r_.spec.quant_options = opts;
        r_.recipe["quant"]["options"] = opts;
        if (main_rank)
          atomic_write_string((fs::path(out_dir) / "recipe.json").string(), rc.dump(2) + "\n");
      }
    }
  }
  // What checkpoints and adapters are only valid with; a resumed run must match it.
  const Json identity =
      run_identity(r_.spec, base_identity(r_.model_path, files.config, *files.weights));
  if (!resume_dir.empty())
    check_run_identity(resumed.identity, identity, "cannot resume from " + resume_dir);

  DataConfig dc;
  dc.path = r_.data_path;
  dc.format = rc["data"]["format"].get<std::string>();
  dc.val_path = r_.val_path;
  dc.val_fraction = r_.val_path.empty() ? rc["data"]["val_fraction"].get<double>() : 0.0;
  dc.seq_len = rc["data"]["seq_len"].get<int64_t>();
  dc.seed = seed;
  DataSplits data = load_data(dc, *tokenizer);
  spdlog::info("data: {} train examples ({} tokens) from {}, {} val examples", data.train->size(),
               data.train->stats().tokens, dc.path, data.val ? data.val->size() : 0);

  LlamaForCausalLM model(files.config, *files.weights, r_.spec);
  files.weights.reset();  // drop the mapping: everything the model needs is now its own
  model->set_activation_checkpointing(t["activation_checkpointing"].get<bool>());
  model->train();
  const double load_s = std::chrono::duration<double>(clock::now() - t_load).count();

  auto named = model->trainable_parameters();
  QTUNE_CHECK(!named.empty(),
              "nothing to train: no trainable parameter (check adapter.target_modules)");
  std::vector<torch::Tensor> params;
  for (auto& [_, p] : named) params.push_back(p);
  const int64_t trainable = model->num_trainable_parameters();
  // Every rank must be about to train the same thing from the same start.
  Json local_recipe = rc;
  for (const char* k : {"output_dir", "plugin_dir", "threads", "log_every"}) local_recipe.erase(k);
  group.check_agreement("run", {{"recipe", local_recipe},
                                {"identity", identity},
                                {"trainable_initial_state", tensor_fingerprint(params)}});
  spdlog::info(
      "model: {} ({}), {} trainable / {} parameters, base linear weights {:.2f} MB, "
      "built in {:.2f}s",
      r_.model_path, to_string(r_.spec.train_type), trainable, model->num_total_parameters(),
      model->linear_weight_bytes() / 1e6, load_s);

  const double lr = t["lr"].get<double>();
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(lr)
                                      .betas({t["beta1"].get<double>(), t["beta2"].get<double>()})
                                      .eps(t["eps"].get<double>())
                                      .weight_decay(t["weight_decay"].get<double>()));

  const int64_t batch_size = t["batch_size"].get<int64_t>();
  const int64_t accum = t["grad_accum"].get<int64_t>();
  const int64_t warmup = t["warmup_steps"].get<int64_t>();
  const double min_ratio = t["min_lr_ratio"].get<double>();
  const double max_norm = t["max_grad_norm"].get<double>();
  const int64_t eval_every = rc["eval"]["every"].get<int64_t>();
  const int64_t eval_batches = rc["eval"]["max_batches"].get<int64_t>();
  const int64_t log_every = rc["log_every"].get<int64_t>();
  const int64_t ckpt_every = rc["checkpoint"]["every"].get<int64_t>();
  const int64_t ckpt_keep = rc["checkpoint"]["keep"].get<int64_t>();
  ShardedLoader loader(data.train, batch_size, group.rank(), world, seed);
  std::unique_ptr<GradientBuckets> buckets;
  if (world > 1)
    buckets = std::make_unique<GradientBuckets>(
        params, static_cast<int64_t>(dist_config_from_recipe(rc).bucket_mb * 1024 * 1024));

  // Progress carried over from earlier sessions of this run.
  int64_t start_step = 0, tokens_seen = 0;
  double prior_train_s = 0;
  double first_val = NAN, last_val = NAN, best_val = NAN;
  if (!resume_dir.empty()) {
    load_checkpoint_tensors(resume_dir, resumed, *model, opt);
    loader.restore(LoaderState::from_json(resumed.loader));
    // Last: building the model drew adapter initialisations from this generator.
    restore_rng_state(resumed.rng);
    start_step = resumed.step;
    const Json& p = resumed.progress;
    tokens_seen = p.value("tokens", int64_t{0});
    prior_train_s = p.value("train_seconds", 0.0);
    first_val = null_to_nan(p, "first_val_loss");
    best_val = null_to_nan(p, "best_val_loss");
    last_val = null_to_nan(p, "last_val_loss");
    spdlog::info("resumed from {} at step {}/{}", resume_dir, start_step, max_steps);
  }

  const std::string metrics_path = (fs::path(out_dir) / "metrics.jsonl").string();
  if (!resume_dir.empty() && main_rank) trim_metrics(metrics_path, start_step);
  std::ofstream metrics;  // rank 0's alone
  if (main_rank) {
    metrics.open(metrics_path, resume_dir.empty() ? std::ios::trunc : std::ios::app);
    QTUNE_CHECK(metrics.good(), "output_dir: cannot write ", out_dir, "/metrics.jsonl");
  }
  auto emit = [&](const Json& j) {
    if (!main_rank) return;
    metrics << j.dump() << "\n";
    metrics.flush();
    if (on_metrics) on_metrics(j);
  };

  auto run_eval = [&](int64_t step) {
    if (!data.val) return;
    auto e = evaluate(*model, *data.val, batch_size, eval_batches, group);
    if (std::isnan(first_val)) first_val = e.loss;
    last_val = e.loss;
    if (std::isnan(best_val) || e.loss < best_val) best_val = e.loss;
    emit({{"type", "eval"},
          {"step", step},
          {"val_loss", e.loss},
          {"val_ppl", std::exp(e.loss)},
          {"val_tokens", e.tokens}});
    if (main_rank)
      spdlog::info("step {}: val_loss {:.4f} (ppl {:.2f})", step, e.loss, std::exp(e.loss));
  };

  const auto t_train = clock::now();
  auto train_seconds = [&] {
    return prior_train_s + std::chrono::duration<double>(clock::now() - t_train).count();
  };
  std::string last_checkpoint;
  int64_t checkpoints_saved = 0, checkpoint_bytes = 0;
  double checkpoint_seconds = 0;
  auto checkpoint = [&](int64_t step) {
    if (!main_rank) return;
    const auto t0 = clock::now();
    CheckpointState st;
    st.step = step;
    st.loader = loader.state().to_json();
    st.rng = capture_rng_state();
    st.progress = {{"tokens", tokens_seen},
                   {"train_seconds", train_seconds()},
                   {"first_val_loss", nan_to_null(first_val)},
                   {"best_val_loss", nan_to_null(best_val)},
                   {"last_val_loss", nan_to_null(last_val)}};
    st.recipe = rc;
    st.identity = identity;
    st.tokenizer = tok_path;
    last_checkpoint = save_checkpoint(ckpt_root, *model, opt, st, ckpt_keep, r_.model_path);
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    const int64_t bytes = directory_bytes(last_checkpoint);
    ++checkpoints_saved;
    checkpoint_seconds += s;
    checkpoint_bytes = bytes;
    spdlog::info("step {}: checkpoint {} ({:.2f} MB, {:.3f}s)", step, last_checkpoint, bytes / 1e6,
                 s);
  };

  if (resume_dir.empty()) run_eval(0);
  Progress progress(max_steps);
  int64_t step = start_step, session_tokens = 0;
  double last_loss = NAN;
  bool stopped = false;
  for (step = start_step + 1; step <= max_steps; ++step) {
    const auto t_step = clock::now();
    const double step_lr = lr_at(step, max_steps, warmup, lr, min_ratio);
    for (auto& group : opt.param_groups())
      static_cast<torch::optim::AdamWOptions&>(group.options()).lr(step_lr);
    opt.zero_grad();
    double loss_sum = 0;
    int64_t step_tokens = 0;
    if (world == 1) {
      for (int64_t micro = 0; micro < accum; ++micro) {
        Batch b = loader.next();
        auto [loss, n] = model->loss(b.tokens, b.targets);
        (loss / static_cast<double>(accum)).backward();
        loss_sum += loss.item<double>();
        step_tokens += b.tokens.numel();
      }
    } else {
      // Data parallel: a micro-batch's loss is the mean over the global batch's targets, so each
      // rank weights its mean by its share of them (the counts are known before the forward
      // passes); the gradients, sums over ranks of the weighted ones, are what one process with
      // the global batch gets.
      std::vector<Batch> micro(accum);
      auto counts = torch::empty({accum}, torch::kInt64);
      for (int64_t m = 0; m < accum; ++m) {
        micro[m] = loader.next();
        counts[m] = micro[m].num_targets;
      }
      auto local_counts = counts.clone();
      group.all_reduce_sum(counts, "the token counts");
      for (int64_t m = 0; m < accum; ++m) {
        const Batch& b = micro[m];
        step_tokens += b.tokens.numel();
        const int64_t local = local_counts[m].item<int64_t>(), global = counts[m].item<int64_t>();
        if (local == 0 || global == 0) continue;
        const double weight = static_cast<double>(local) / static_cast<double>(global);
        auto [loss, n] = model->loss(b.tokens, b.targets);
        (loss * (weight / static_cast<double>(accum))).backward();
        loss_sum += loss.item<double>() * weight;
      }
      buckets->all_reduce(group);
      auto totals = torch::tensor({loss_sum, static_cast<double>(step_tokens)}, torch::kFloat64);
      group.all_reduce_sum(totals, "the step's loss");
      loss_sum = totals[0].item<double>();
      step_tokens = static_cast<int64_t>(totals[1].item<double>());
    }
    const double grad_norm =
        torch::nn::utils::clip_grad_norm_(params, max_norm > 0 ? max_norm : INFINITY);
    QTUNE_CHECK(std::isfinite(loss_sum), "training diverged at step ", step,
                ": loss is not finite (lower train.lr?)");
    opt.step();
    tokens_seen += step_tokens;
    session_tokens += step_tokens;
    last_loss = loss_sum / static_cast<double>(accum);
    const double step_s = std::chrono::duration<double>(clock::now() - t_step).count();
    const double elapsed = std::chrono::duration<double>(clock::now() - t_train).count();
    const double tok_s = session_tokens / std::max(1e-9, elapsed);
    emit({{"type", "train"},
          {"step", step},
          {"loss", last_loss},
          {"lr", step_lr},
          {"grad_norm", grad_norm},
          {"tokens_per_s", step_tokens / std::max(1e-9, step_s)},
          {"step_s", step_s},
          {"epoch", loader.epoch()}});
    if (main_rank)
      progress.update(step, last_loss, tok_s,
                      elapsed / static_cast<double>(step - start_step) * (max_steps - step));
    if (main_rank && !progress.tty() && (step % log_every == 0 || step == start_step + 1))
      spdlog::info("step {}/{}: loss {:.4f} lr {:.2e} grad_norm {:.3f} {:.0f} tok/s", step,
                   max_steps, last_loss, step_lr, grad_norm, tok_s);
    detail::debug_point("step", step, out_dir, &Trainer::stop_requested);
    // A stop asked of any rank stops every rank after this same step.
    stopped = group.any(g_stop.load(), "the stop check");
    const bool last = step == max_steps || stopped;
    if ((eval_every > 0 && step % eval_every == 0) || last) {
      progress.finish();
      run_eval(step);
    }
    // After the eval, so the checkpoint's best/last validation loss includes this step's.
    if ((ckpt_every > 0 && step % ckpt_every == 0) || last) checkpoint(step);
    if (last) break;
  }
  progress.finish();
  const int64_t steps_done = std::min(step, max_steps);
  const double train_s = train_seconds();
  if (stopped)
    spdlog::info("stopped at step {} on request; checkpoint {}", steps_done, last_checkpoint);
  // The replicas must have stayed identical (same data order, same reduced gradients).
  const std::string final_fingerprint = tensor_fingerprint(params);
  group.check_agreement("final trainable state", {{"trainable_state", final_fingerprint}});

  // Outputs: adapters in PEFT layout, or the full model as an HF directory.
  std::string saved;
  if (!main_rank) {
    saved = (fs::path(out_dir) / (r_.spec.train_type == TrainType::kFull ? "model" : "adapter")).string();
  } else if (r_.spec.train_type == TrainType::kFull) {
    saved = (fs::path(out_dir) / "model").string();
    auto weights = model_weights(*model, /*merge_adapters=*/false);
    save_hf_model(saved, files.config, *weights, torch::kFloat32, tok_path);
  } else {
    saved = (fs::path(out_dir) / "adapter").string();
    save_peft_adapter(saved, *model, r_.model_path,
                      Json{{"identity", identity}, {"tokenizer", tok_path}, {"step", steps_done}});
  }

  Json summary = {
      {"train_type", to_string(r_.spec.train_type)},
      {"dtype", rc["dtype"]},
      {"quant", r_.spec.quant ? Json(r_.spec.quant->name()) : Json(nullptr)},
      {"quant_options", r_.spec.quant ? r_.spec.quant_options : Json(nullptr)},
      {"adapter", r_.spec.adapter ? Json(r_.spec.adapter->name()) : Json(nullptr)},
      {"adapter_options", r_.spec.adapter ? r_.spec.adapter_options : Json(nullptr)},
      {"model", r_.model_path},
      {"steps", steps_done},
      {"trainable_parameters", trainable},
      {"total_parameters", model->num_total_parameters()},
      {"linear_weight_bytes", model->linear_weight_bytes()},
      {"base_weight_bytes", model->base_weight_bytes()},
      {"peak_rss_bytes", peak_rss_bytes()},
      {"tokens", tokens_seen},
      {"train_seconds", train_s},
      {"load_seconds", load_s},
      {"tokens_per_s", tokens_seen / std::max(1e-9, train_s)},
      {"final_train_loss", nan_to_null(last_loss)},
      {"first_val_loss", nan_to_null(first_val)},
      {"final_val_loss", nan_to_null(last_val)},
      {"best_val_loss", nan_to_null(best_val)},
      {"saved", saved},
      {"checkpoint", last_checkpoint.empty() ? Json(nullptr) : Json(last_checkpoint)},
      {"checkpoints_saved", checkpoints_saved},
      {"checkpoint_bytes", checkpoint_bytes},
      {"checkpoint_save_seconds", checkpoint_seconds},
      {"resumed_from", resume_dir.empty() ? Json(nullptr) : Json(resume_dir)},
      {"stopped_early", steps_done < max_steps},
      {"dist",
       {{"world_size", world},
        {"rank", group.rank()},
        {"backend", group.backend()},
        {"threads_per_rank", at::get_num_threads()},
        {"buckets", buckets ? buckets->num_buckets() : 0},
        {"gradient_bytes_per_step", buckets ? buckets->bytes() : 0},
        {"allreduce_seconds", group.reduce_seconds()},
        {"allreduce_bytes_per_step",
         steps_done > start_step ? group.reduce_bytes() / (steps_done - start_step) : 0},
        {"trainable_fingerprint", final_fingerprint}}},
  };
  if (main_rank)
    atomic_write_string((fs::path(out_dir) / "summary.json").string(), summary.dump(2) + "\n");
  return summary;
}

}  // namespace

}  // namespace qtune
