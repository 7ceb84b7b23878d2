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
#include "qtune/run_identity.h"
#include "qtune/data.h"
#include "qtune/data_shard.h"
#include "qtune/sharded_base.h"
#include "qtune/error.h"
#include "qtune/files.h"
#include "qtune/gradient_buckets.h"
#include "qtune/optimizer_shards.h"
#include "qtune/model_files.h"
#include "qtune/output_dir.h"
#include "qtune/peft.h"
#include "qtune/process.h"
#include "qtune/process_group.h"
#include "qtune/recipe.h"
#include "qtune/tokenizer.h"

namespace fs = std::filesystem;

namespace qtune {

namespace {
std::atomic<bool> g_stop{false};
}

void Trainer::request_stop() { g_stop.store(true); }

double lr_at(int64_t step, int64_t total, int64_t warmup, double lr, double min_ratio) {
  if (warmup > 0 && step <= warmup) return lr * static_cast<double>(step) / warmup;
  if (total <= warmup) return lr;
  const double progress =
      std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(total - warmup));
  return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + std::cos(M_PI * progress)));
}

// ---------------------------------------------------------------------------------------------
// Resolving a recipe

ResolvedRecipe resolve_recipe(const Json& tree, const Registry& registry) {
  ResolvedRecipe r;
  r.recipe = Recipe::from_json(tree);
  Recipe& rc = r.recipe;
  r.model_path = resolve_data_path(rc.model.path, "model.path");
  if (!rc.model.tokenizer.empty()) r.tokenizer_path = resolve_data_path(rc.model.tokenizer, "model.tokenizer");
  r.data_path = resolve_data_path(rc.data.path, "data.path");
  if (!rc.data.val_path.empty()) r.val_path = resolve_data_path(rc.data.val_path, "data.val_path");
  r.spec = TuningSpec::for_training(parse_train_type(rc.train_type), parse_dtype(rc.dtype),
                                    registry, rc.quant.name, rc.quant.options,
                                    rc.quant.skip_output, rc.adapter.name, rc.adapter.options,
                                    rc.adapter.target_modules, rc.quant.skip_modules);
  // The tree records the options in force, defaults included.
  if (r.spec.quantized_base()) rc.quant.options = r.spec.base.quant_options;
  if (r.spec.adapter.present()) rc.adapter.options = r.spec.adapter.options;
  r.tree = rc.to_json();
  return r;
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
// With a sharded base every rank must run the same number of forward passes (each gathers every
// layer), so a rank with fewer eval batches than another, or a batch without targets, runs a
// one-token forward in its place.
EvalResult evaluate_loss(LlamaForCausalLMImpl& model, const TokenDataset& data, int64_t batch_size,
                         int64_t max_batches, ProcessGroup& group) {
  torch::NoGradGuard no_grad;
  const bool was_training = model.is_training();
  const auto& shards = model.spec().base.shards;
  model.eval();
  double sum = 0;
  int64_t count = 0;
  auto score = [&](const Batch& b) {
    auto [loss, n] = model.loss(b.tokens, b.targets, b.positions, b.segments);
    sum += loss.item<double>() * static_cast<double>(n);
    count += n;
  };
  if (!shards) {
    for_each_eval_share(data, batch_size, group.rank(), group.world_size(), max_batches,
                        [&](const Batch& b) {
                          if (b.num_targets > 0) score(b);
                        });
  } else {
    std::vector<Batch> mine;
    for_each_eval_share(data, batch_size, group.rank(), group.world_size(), max_batches,
                        [&](const Batch& b) { mine.push_back(b); });
    auto passes = torch::zeros({group.world_size()}, torch::kInt64);
    passes[group.rank()] = static_cast<int64_t>(mine.size());
    group.all_reduce_sum(passes, "the evaluation's pass count");
    const int64_t most = passes.max().item<int64_t>();
    for (int64_t i = 0; i < most; ++i) {
      if (i < static_cast<int64_t>(mine.size()) && mine[i].num_targets > 0)
        score(mine[i]);
      else
        model.forward(torch::zeros({1, 1}, torch::kInt64));
    }
    shards->release_all();
  }
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
    if (k == "output_dir" || k == "resume" || k == "overwrite" || k == "plugin_dir" ||
        k == "log_every")
      continue;
    auto it = a.find(k);
    if (it == a.end() || it->second != v)
      out.push_back(k + " " + (it == a.end() ? std::string("(unset)") : it->second.dump()) +
                    " -> " + v.dump());
  }
  return out;
}

// What a run leaves in its output_dir.
constexpr const char* kRunEntries[] = {"recipe.json", "metrics.jsonl", "summary.json",
                                       "checkpoints", "adapter",     "model"};

// A new run in a directory that holds one is refused unless resuming it or replacing it
// (`overwrite` removes the earlier run's entries; anything else in the directory stays).
void claim_output_dir(const std::string& dir, bool overwrite, bool resuming) {
  if (resuming) return;
  std::vector<std::string> found;
  for (const char* name : kRunEntries)
    if (fs::exists(fs::path(dir) / name)) found.push_back(name);
  if (found.empty()) return;
  std::string list;
  for (const auto& f : found) list += (list.empty() ? "" : ", ") + f;
  QTUNE_CHECK(overwrite, "output_dir: ", dir, " already holds a run (", list,
              "); continue it with --resume latest, replace it with --overwrite, or choose "
              "another output_dir");
  spdlog::warn("output_dir: overwrite: removing the earlier run's {} in {}", list, dir);
  for (const auto& f : found) {
    std::error_code ec;
    fs::remove_all(fs::path(dir) / f, ec);
    QTUNE_CHECK(!ec, "output_dir: cannot remove ", (fs::path(dir) / f).string(), ": ",
                ec.message());
  }
}

// What the training split is made of: with data.pack, fewer examples and less padding.
Json data_summary(const TokenDataset& d) {
  const auto& st = d.stats();
  const double positions = static_cast<double>(st.examples * d.seq_len());
  return {{"format", st.format},
          {"packed", d.packed()},
          {"examples", st.examples},
          {"target_tokens", st.target_tokens},
          {"padding_fraction", positions > 0 ? static_cast<double>(st.padding_tokens) / positions
                                             : 0.0}};
}

Json nan_to_null(double v) { return std::isnan(v) ? Json(nullptr) : Json(v); }
double null_to_nan(const Json& j, const char* key) {
  return j.contains(key) && j[key].is_number() ? j[key].get<double>() : NAN;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The run, step by step

struct Trainer::Run {
  using clock = std::chrono::steady_clock;
  std::string out_dir, ckpt_root, tok_path;
  std::unique_ptr<DirectoryLock> lock;  // of out_dir, on rank 0
  ModelConfig config;
  Json identity;
  DataSplits data;
  LlamaForCausalLM model{nullptr};
  std::vector<torch::Tensor> params;
  std::unique_ptr<torch::optim::AdamW> opt;
  std::unique_ptr<ShardedLoader> loader;
  // Data parallel (a world of one without a launcher)
  std::shared_ptr<ProcessGroup> group;
  std::unique_ptr<GradientBuckets> buckets;
  std::unique_ptr<OptimizerShards> zero;  // dist.shard_optimizer on more than one rank
  bool main = true, stopped = false;
  std::ofstream metrics;
  double load_s = 0;
  // Resume
  std::string resume_dir;
  CheckpointState resumed;
  // Progress, carried over from earlier sessions of this run
  int64_t start_step = 0, tokens_seen = 0, session_tokens = 0;
  double prior_train_s = 0, last_loss = NAN;
  double first_val = NAN, last_val = NAN, best_val = NAN;
  clock::time_point t_train;
  // Checkpoints of this session
  std::string last_checkpoint;
  int64_t checkpoints_saved = 0, checkpoint_bytes = 0;
  double checkpoint_seconds = 0;

  double train_seconds() const {
    return prior_train_s + std::chrono::duration<double>(clock::now() - t_train).count();
  }
};

Trainer::Trainer(ResolvedRecipe recipe) : r_(std::move(recipe)) {}
Trainer::~Trainer() = default;

bool Trainer::stop_requested() { return g_stop.load(); }

void Trainer::emit(const Json& j) {
  if (!run_->main) return;  // rank 0 writes for the job
  run_->metrics << j.dump() << "\n";
  run_->metrics.flush();
  if (on_metrics) on_metrics(j);
}

namespace {

// A qtune-quantize directory is used as it was quantized: its options are the run's.
void adopt_prequantized(ResolvedRecipe& r, const WeightSource& weights) {
  const Json pq = prequantized_options(weights);
  if (pq.is_null()) return;
  BaseSpec& base = r.spec.base;
  QTUNE_CHECK(pq["backend"] == base.quant->name(), "quant.name: ", r.model_path,
              " is quantized with ", pq["backend"].dump(), ", but quant.name is \"",
              base.quant->name(), "\"");
  const Json opts = base.quant->check_options(pq["options"], r.model_path);
  if (opts == base.quant_options) return;
  spdlog::info("quant: {} was quantized with options {}; those apply (not {})", r.model_path,
               opts.dump(), base.quant_options.dump());
  base.quant_options = opts;
  r.recipe.quant.options = opts;
  r.tree["quant"]["options"] = opts;
}

}  // namespace

void Trainer::setup() {
  Run& s = *run_;
  const Recipe& rc = r_.recipe;
  // Local ranks share the cores.
  const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  at::set_num_threads(static_cast<int>(
      rc.threads > 0 ? rc.threads
                     : std::max<int64_t>(1, cores / s.group->world().local_world_size)));
  torch::manual_seed(rc.seed);
  s.out_dir = rc.output_dir;
  s.ckpt_root = (fs::path(s.out_dir) / "checkpoints").string();

  // A checkpoint to resume from is read (and its format checked) before anything is loaded.
  if (!rc.resume.empty()) {
    s.resume_dir = resolve_checkpoint(rc.resume, s.ckpt_root);
    s.resumed = read_checkpoint_state(s.resume_dir);
    QTUNE_CHECK(s.resumed.step < rc.train.max_steps, "resume: checkpoint ", s.resume_dir,
                " is at step ", s.resumed.step, ", which already reaches train.max_steps ",
                rc.train.max_steps, "; raise --max_steps to train further");
    for (const auto& change : recipe_changes(s.resumed.recipe, r_.tree))
      spdlog::warn("resume: recipe changed since the checkpoint: {}", change);
  }
  // Rank 0 writes for the job: it holds output_dir for the whole run, and a run already there is
  // only continued (resume) or replaced (overwrite), never mixed with this one.
  if (s.main) {
    s.lock = std::make_unique<DirectoryLock>(s.out_dir, "output_dir");
    claim_output_dir(s.out_dir, rc.overwrite, !rc.resume.empty());
  }

  // Model first (it may name its own tokenizer), then data.
  const auto t_load = Run::clock::now();
  ModelFiles files = open_model(r_.model_path);
  s.config = files.config;
  QTUNE_CHECK(rc.data.seq_len <= files.config.max_position_embeddings, "data.seq_len ",
              rc.data.seq_len, " is longer than the context of ", r_.model_path, " (",
              files.config.max_position_embeddings,
              " positions, max_position_embeddings); lower data.seq_len (--seq_len)");
  s.tok_path = r_.tokenizer_path.empty() ? files.tokenizer_path : r_.tokenizer_path;
  QTUNE_CHECK(!s.tok_path.empty(), "model.tokenizer: ", r_.model_path,
              " has no tokenizer beside it; set model.tokenizer (--tokenizer)");
  auto tokenizer = load_tokenizer(s.tok_path);
  QTUNE_CHECK(tokenizer->vocab_size() <= files.config.vocab_size, "model.tokenizer: ", s.tok_path,
              " has ", tokenizer->vocab_size(), " tokens but the model's vocabulary is ",
              files.config.vocab_size);
  if (r_.spec.quantized_base()) adopt_prequantized(r_, *files.weights);
  if (s.main)
    atomic_write_string((fs::path(s.out_dir) / "recipe.json").string(), r_.tree.dump(2) + "\n");
  // What checkpoints and adapters are only valid with; a resumed run must match it.
  s.identity = run_identity(r_.spec, base_identity(r_.model_path, files.config, *files.weights));
  if (!s.resume_dir.empty())
    check_run_identity(s.resumed.identity, s.identity, "cannot resume from " + s.resume_dir);

  DataConfig dc;
  dc.path = r_.data_path;
  dc.format = rc.data.format;
  dc.val_path = r_.val_path;
  dc.val_fraction = r_.val_path.empty() ? rc.data.val_fraction : 0.0;
  dc.seq_len = rc.data.seq_len;
  dc.seed = rc.seed;
  dc.chat_template = rc.data.chat_template;
  // data.template auto: the model's own, from the tokenizer_config.json beside its tokenizer.
  dc.model_chat_template = tokenizer->config().chat_template;
  dc.model_chat_template_origin = tokenizer->config().path;
  dc.messages_field = rc.data.messages_field;
  dc.role_field = rc.data.role_field;
  dc.content_field = rc.data.content_field;
  dc.role_system = rc.data.role_system;
  dc.role_user = rc.data.role_user;
  dc.role_assistant = rc.data.role_assistant;
  dc.train_on_prompt = rc.data.train_on_prompt;
  dc.overlong = rc.data.overlong;
  dc.pack = rc.data.pack;
  s.data = load_data(dc, *tokenizer);
  spdlog::info("data: {} train examples ({} tokens) from {}, {} val examples", s.data.train->size(),
               s.data.train->stats().tokens, dc.path, s.data.val ? s.data.val->size() : 0);

  // dist.shard_base: each rank keeps 1/N of the quantized base (a world of one keeps it all).
  if (rc.dist.shard_base) {
    QTUNE_CHECK(r_.spec.quantized_base(), "dist.shard_base shards a quantized base: it needs "
                "--train_type qlora, got ", r_.spec.name());
    if (s.group->world_size() > 1)
      r_.spec.base.shards = std::make_shared<BaseShards>(s.group, r_.spec.base.quant);
    else
      spdlog::info("dist.shard_base: a world of one rank keeps the whole base");
  }
  s.model = LlamaForCausalLM(files.config, *files.weights, r_.spec);
  files.weights.reset();  // drop the mapping: everything the model needs is now its own
  s.model->set_activation_checkpointing(rc.train.activation_checkpointing);
  s.model->train();
  s.load_s = std::chrono::duration<double>(Run::clock::now() - t_load).count();

  auto named = s.model->trainable_parameters();
  QTUNE_CHECK(!named.empty(),
              "nothing to train: no trainable parameter (check adapter.target_modules)");
  for (auto& [_, p] : named) s.params.push_back(p);
  // Every rank must be about to train the same thing from the same start.
  Json local_recipe = r_.tree;
  for (const char* k : {"output_dir", "overwrite", "plugin_dir", "threads", "log_every"})
    local_recipe.erase(k);
  s.group->check_agreement("run", {{"recipe", local_recipe},
                                   {"identity", s.identity},
                                   {"trainable_initial_state", tensor_fingerprint(s.params)}});
  spdlog::info(
      "model: {} ({}), {} trainable / {} parameters, base linear weights {:.2f} MB, "
      "built in {:.2f}s",
      r_.model_path, r_.spec.name(), s.model->num_trainable_parameters(),
      s.model->num_total_parameters(), s.model->linear_weight_bytes() / 1e6, s.load_s);

  const TrainRecipe& t = rc.train;
  if (rc.dist.shard_optimizer && s.group->world_size() > 1)
    s.zero =
        std::make_unique<OptimizerShards>(s.params, s.group->rank(), s.group->world_size());
  else if (rc.dist.shard_optimizer)
    spdlog::info("dist.shard_optimizer: a world of one rank keeps the whole optimizer state");
  s.opt = std::make_unique<torch::optim::AdamW>(
      s.zero ? s.zero->owned() : s.params, torch::optim::AdamWOptions(t.lr)
                    .betas({t.beta1, t.beta2})
                    .eps(t.eps)
                    .weight_decay(t.weight_decay));
  s.loader = std::make_unique<ShardedLoader>(s.data.train, t.batch_size, s.group->rank(),
                                             s.group->world_size(), rc.seed);
  if (s.group->world_size() > 1)
    s.buckets = std::make_unique<GradientBuckets>(
        s.params, static_cast<int64_t>(rc.dist.bucket_mb * 1024 * 1024));
}

void Trainer::resume() {
  Run& s = *run_;
  const std::string metrics_path = (fs::path(s.out_dir) / "metrics.jsonl").string();
  if (!s.resume_dir.empty()) {
    load_checkpoint_tensors(s.resume_dir, s.resumed, *s.model, *s.opt);
    s.loader->restore(LoaderState::from_json(s.resumed.loader));
    // Last: building the model drew adapter initialisations from this generator.
    try {
      restore_rng_state(s.resumed.rng);
    } catch (const UserError& e) {
      throw UserError((fs::path(s.resume_dir) / "trainer_state.json").string() + ": " + e.what());
    }
    s.start_step = s.resumed.step;
    const Json& p = s.resumed.progress;
    s.tokens_seen = p.value("tokens", int64_t{0});
    s.prior_train_s = p.value("train_seconds", 0.0);
    s.first_val = null_to_nan(p, "first_val_loss");
    s.best_val = null_to_nan(p, "best_val_loss");
    s.last_val = null_to_nan(p, "last_val_loss");
    spdlog::info("resumed from {} at step {}/{}", s.resume_dir, s.start_step,
                 r_.recipe.train.max_steps);
    if (s.main) trim_metrics(metrics_path, s.start_step);
  }
  if (!s.main) return;
  s.metrics.open(metrics_path, s.resume_dir.empty() ? std::ios::trunc : std::ios::app);
  QTUNE_CHECK(s.metrics.good(), "output_dir: cannot write ", s.out_dir, "/metrics.jsonl");
}

namespace {

// Data parallel: a micro-batch's loss is the mean over the global batch's targets, so each rank
// weights its mean by its share of them (the counts are known before the forward passes); the
// gradients, sums over ranks of the weighted ones, are what one process with the global batch
// gets. Returns the step's summed loss and tokens over all ranks.
std::pair<double, int64_t> data_parallel_backward(ProcessGroup& group, ShardedLoader& loader,
                                                  LlamaForCausalLMImpl& model,
                                                  GradientBuckets& buckets, int64_t accum) {
  std::vector<Batch> micro(accum);
  auto counts = torch::empty({accum}, torch::kInt64);
  for (int64_t m = 0; m < accum; ++m) {
    micro[m] = loader.next();
    counts[m] = micro[m].num_targets;
  }
  auto local_counts = counts.clone();
  group.all_reduce_sum(counts, "the token counts");
  // A micro-batch without targets here is skipped (with a sharded base it runs with weight 0:
  // every rank must gather the same layers); the last one run sends its gradients bucket by
  // bucket during its backward, and finish() sends the rest in the same order on every rank.
  const bool sharded = model.spec().base.shards != nullptr;
  auto runs = [&](int64_t m) {
    return (sharded || local_counts[m].item<int64_t>() > 0) && counts[m].item<int64_t>() > 0;
  };
  int64_t last = accum - 1;
  while (last >= 0 && !runs(last)) --last;
  double loss_sum = 0;
  int64_t step_tokens = 0;
  for (int64_t m = 0; m < accum; ++m) {
    const Batch& b = micro[m];
    step_tokens += b.tokens.numel();
    if (!runs(m)) continue;
    const int64_t local = local_counts[m].item<int64_t>(), global = counts[m].item<int64_t>();
    const double weight = static_cast<double>(local) / static_cast<double>(global);
    torch::Tensor targets = b.targets;
    if (local == 0) {
      // A sharded base gathers every layer in forward and backward on every rank: this rank
      // runs the micro-batch too, with weight 0 (one target made valid so the loss is finite;
      // its gradients are exact zeros).
      targets = b.targets.clone();
      targets.view({-1})[0] = 0;
    }
    auto [loss, n] = model.loss(b.tokens, targets, b.positions, b.segments);
    if (m == last) buckets.arm(group);
    (loss * (weight / static_cast<double>(accum))).backward();
    loss_sum += loss.item<double>() * weight;
  }
  buckets.finish(group);
  auto totals = torch::tensor({loss_sum, static_cast<double>(step_tokens)}, torch::kFloat64);
  group.all_reduce_sum(totals, "the step's loss");
  return {totals[0].item<double>(), static_cast<int64_t>(totals[1].item<double>())};
}

}  // namespace

Json Trainer::step(int64_t step) {
  Run& s = *run_;
  const TrainRecipe& t = r_.recipe.train;
  const double step_lr = lr_at(step, t.max_steps, t.warmup_steps, t.lr, t.min_lr_ratio);
  for (auto& group : s.opt->param_groups())
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(step_lr);
  const auto t_step = Run::clock::now();
  s.opt->zero_grad();
  if (s.zero) s.zero->zero_others_grad();
  double loss_sum = 0;
  int64_t step_tokens = 0;
  if (s.group->world_size() == 1) {
    for (int64_t micro = 0; micro < t.grad_accum; ++micro) {
      Batch b = s.loader->next();
      auto [loss, n] = s.model->loss(b.tokens, b.targets, b.positions, b.segments);
      (loss / static_cast<double>(t.grad_accum)).backward();
      loss_sum += loss.item<double>();
      step_tokens += b.tokens.numel();
    }
  } else {
    std::tie(loss_sum, step_tokens) =
        data_parallel_backward(*s.group, *s.loader, *s.model, *s.buckets, t.grad_accum);
  }
  // A sharded base holds only its shards between steps.
  if (r_.spec.base.shards) r_.spec.base.shards->release_all();
  const double grad_norm = torch::nn::utils::clip_grad_norm_(
      s.params, t.max_grad_norm > 0 ? t.max_grad_norm : INFINITY);
  QTUNE_CHECK(std::isfinite(loss_sum), "training diverged at step ", step,
              ": loss is not finite (lower train.lr?)");
  s.opt->step();
  if (s.zero) s.zero->share_parameters(*s.group);
  s.tokens_seen += step_tokens;
  s.session_tokens += step_tokens;
  const double loss = loss_sum / static_cast<double>(t.grad_accum);
  const double step_s = std::chrono::duration<double>(Run::clock::now() - t_step).count();
  const Json record = {{"type", "train"},
                       {"step", step},
                       {"loss", loss},
                       {"lr", step_lr},
                       {"grad_norm", grad_norm},
                       {"tokens_per_s", step_tokens / std::max(1e-9, step_s)},
                       {"step_s", step_s},
                       {"epoch", s.loader->epoch()}};
  emit(record);
  return record;
}

void Trainer::evaluate(int64_t step) {
  Run& s = *run_;
  if (!s.data.val) return;
  auto e = evaluate_loss(*s.model, *s.data.val, r_.recipe.train.batch_size,
                         r_.recipe.eval.max_batches, *s.group);
  if (std::isnan(s.first_val)) s.first_val = e.loss;
  s.last_val = e.loss;
  if (std::isnan(s.best_val) || e.loss < s.best_val) s.best_val = e.loss;
  emit({{"type", "eval"},
        {"step", step},
        {"val_loss", e.loss},
        {"val_ppl", std::exp(e.loss)},
        {"val_tokens", e.tokens}});
  if (s.main) spdlog::info("step {}: val_loss {:.4f} (ppl {:.2f})", step, e.loss, std::exp(e.loss));
}

void Trainer::save(int64_t step) {
  Run& s = *run_;
  // With dist.shard_optimizer every rank sends its moments and rank 0 saves them all.
  const auto whole = s.zero ? s.zero->gather_state(*s.group, *s.opt) : nullptr;
  if (!s.main) return;
  const auto t0 = Run::clock::now();
  CheckpointState st;
  st.step = step;
  st.loader = s.loader->state().to_json();
  st.rng = capture_rng_state();
  st.progress = {{"tokens", s.tokens_seen},
                 {"train_seconds", s.train_seconds()},
                 {"first_val_loss", nan_to_null(s.first_val)},
                 {"best_val_loss", nan_to_null(s.best_val)},
                 {"last_val_loss", nan_to_null(s.last_val)}};
  st.recipe = r_.tree;
  st.identity = s.identity;
  st.tokenizer = s.tok_path;
  s.last_checkpoint = save_checkpoint(s.ckpt_root, *s.model, whole ? *whole : *s.opt, st,
                                      r_.recipe.checkpoint.keep, r_.model_path);
  const double sec = std::chrono::duration<double>(Run::clock::now() - t0).count();
  s.checkpoint_bytes = directory_bytes(s.last_checkpoint);
  ++s.checkpoints_saved;
  s.checkpoint_seconds += sec;
  spdlog::info("step {}: checkpoint {} ({:.2f} MB, {:.3f}s)", step, s.last_checkpoint,
               s.checkpoint_bytes / 1e6, sec);
}

// Adapters in PEFT layout, or the full model as an HF directory.
std::string Trainer::save_outputs(int64_t steps_done) {
  Run& s = *run_;
  if (r_.spec.trainable_base()) {
    const std::string dir = (fs::path(s.out_dir) / "model").string();
    if (!s.main) return dir;
    auto weights = model_weights(*s.model, /*merge_adapters=*/false);
    save_hf_model(dir, s.config, *weights, torch::kFloat32, s.tok_path);
    return dir;
  }
  const std::string dir = (fs::path(s.out_dir) / "adapter").string();
  if (!s.main) return dir;
  save_peft_adapter(dir, *s.model, r_.model_path,
                    Json{{"identity", s.identity}, {"tokenizer", s.tok_path}, {"step", steps_done}});
  return dir;
}

Json Trainer::summary(int64_t steps_done, const std::string& saved) {
  Run& s = *run_;
  const TuningSpec& spec = r_.spec;
  const double train_s = s.train_seconds();
  // What the whole base holds, and (rank_base_weight_bytes) what this rank holds of it.
  const auto& shards = spec.base.shards;
  const int64_t base_bytes = s.model->base_weight_bytes() +
                             (shards ? shards->full_bytes() - shards->shard_bytes() : 0);
  Json summary = {
      {"train_type", spec.name()},
      {"dtype", r_.recipe.dtype},
      {"quant", spec.quantized_base() ? Json(spec.base.quant->name()) : Json(nullptr)},
      {"quant_options", spec.quantized_base() ? spec.base.quant_options : Json(nullptr)},
      {"adapter", spec.adapter.present() ? Json(spec.adapter.factory->name()) : Json(nullptr)},
      {"adapter_options", spec.adapter.present() ? spec.adapter.options : Json(nullptr)},
      {"model", r_.model_path},
      {"steps", steps_done},
      {"trainable_parameters", s.model->num_trainable_parameters()},
      {"total_parameters", s.model->num_total_parameters()},
      {"linear_weight_bytes", s.model->linear_weight_bytes()},
      {"base_weight_bytes", base_bytes},
      {"rank_base_weight_bytes", s.model->base_weight_bytes()},
      {"peak_rss_bytes", peak_rss_bytes()},
      {"tokens", s.tokens_seen},
      {"data", data_summary(*s.data.train)},
      {"train_seconds", train_s},
      {"load_seconds", s.load_s},
      {"tokens_per_s", s.tokens_seen / std::max(1e-9, train_s)},
      {"final_train_loss", nan_to_null(s.last_loss)},
      {"first_val_loss", nan_to_null(s.first_val)},
      {"final_val_loss", nan_to_null(s.last_val)},
      {"best_val_loss", nan_to_null(s.best_val)},
      {"saved", saved},
      {"checkpoint", s.last_checkpoint.empty() ? Json(nullptr) : Json(s.last_checkpoint)},
      {"checkpoints_saved", s.checkpoints_saved},
      {"checkpoint_bytes", s.checkpoint_bytes},
      {"checkpoint_save_seconds", s.checkpoint_seconds},
      {"resumed_from", s.resume_dir.empty() ? Json(nullptr) : Json(s.resume_dir)},
      {"stopped_early", steps_done < r_.recipe.train.max_steps},
      {"dist",
       {{"world_size", s.group->world_size()},
        {"rank", s.group->rank()},
        {"local_world_size", s.group->world().local_world_size},
        {"backend", s.group->backend()},
        {"threads_per_rank", at::get_num_threads()},
        {"buckets", s.buckets ? s.buckets->num_buckets() : 0},
        {"gradient_bytes_per_step", s.buckets ? s.buckets->bytes() : 0},
        {"allreduce_seconds", s.group->reduce_seconds()},
        {"allreduce_bytes_per_step", steps_done > s.start_step
                                         ? s.group->reduce_bytes() / (steps_done - s.start_step)
                                         : 0},
        {"trainable_fingerprint", tensor_fingerprint(s.params)},
        {"shard_base", shards ? shards->stats() : Json(nullptr)},
        {"shard_optimizer", s.zero ? s.zero->stats() : Json(nullptr)}}},
  };
  if (s.main)
    atomic_write_string((fs::path(s.out_dir) / "summary.json").string(), summary.dump(2) + "\n");
  return summary;
}

// The process group is part of the run set-up: joined from the launcher's environment (a world
// of one without a launcher) before anything is loaded, left after the outputs are written.
Json Trainer::run() {
  g_stop.store(false);
  run_ = std::make_unique<Run>();
  const DistConfig dist = dist_config_from_recipe(r_.tree);
  const WorldInfo world = world_from_environment(current_environment(), dist);
  if (world.rank > 0)
    spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [rank " + std::to_string(world.rank) + "] [%l] %v");
  try {
    run_->group =
        world.world_size > 1 ? ProcessGroup::join(world, dist, "cpu") : ProcessGroup::single();
    run_->main = run_->group->is_main();
    Json summary = run_steps();
    run_->group->finish();
    return summary;
  } catch (const std::exception& e) {
    if (run_->group) run_->group->announce_failure(e.what());
    if (world.rank > 0 && dynamic_cast<const UserError*>(&e))
      throw UserError("rank " + std::to_string(world.rank) + ": " + e.what());
    throw;
  }
}

Json Trainer::run_steps() {
  setup();
  resume();
  Run& s = *run_;
  const Recipe& rc = r_.recipe;
  const int64_t max_steps = rc.train.max_steps;
  if (s.resume_dir.empty()) evaluate(0);
  Progress progress(s.main ? max_steps : 0);
  s.t_train = Run::clock::now();
  int64_t step = s.start_step;
  for (step = s.start_step + 1; step <= max_steps; ++step) {
    const Json rec = this->step(step);
    s.last_loss = rec["loss"].get<double>();
    const double elapsed = std::chrono::duration<double>(Run::clock::now() - s.t_train).count();
    const double tok_s = s.session_tokens / std::max(1e-9, elapsed);
    if (s.main)
      progress.update(step, s.last_loss, tok_s,
                      elapsed / static_cast<double>(step - s.start_step) * (max_steps - step));
    if (s.main && !progress.tty() && (step % rc.log_every == 0 || step == s.start_step + 1))
      spdlog::info("step {}/{}: loss {:.4f} lr {:.2e} grad_norm {:.3f} {:.0f} tok/s", step,
                   max_steps, s.last_loss, rec["lr"].get<double>(),
                   rec["grad_norm"].get<double>(), tok_s);
    detail::debug_point("step", step, s.out_dir, &Trainer::stop_requested);
    // A stop asked of any rank stops every rank after this same step.
    s.stopped = s.group->any(g_stop.load(), "the stop check");
    const bool last = step == max_steps || s.stopped;
    if ((rc.eval.every > 0 && step % rc.eval.every == 0) || last) {
      progress.finish();
      evaluate(step);
    }
    // After the eval, so the checkpoint's best/last validation loss includes this step's.
    if ((rc.checkpoint.every > 0 && step % rc.checkpoint.every == 0) || last) save(step);
    if (last) break;
  }
  progress.finish();
  const int64_t steps_done = std::min(step, max_steps);
  if (s.stopped)
    spdlog::info("stopped at step {} on request; checkpoint {}", steps_done, s.last_checkpoint);
  // The replicas must have stayed identical (same data order, same reduced gradients).
  s.group->check_agreement("final trainable state",
                           {{"trainable_state", tensor_fingerprint(s.params)}});
  const std::string saved = save_outputs(steps_done);
  return summary(steps_done, saved);
}

}  // namespace qtune
