// Training checkpoints: the state file and RNG, atomic save, load (see checkpoint.h).
#include "qtune/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <spdlog/spdlog.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <type_traits>
#include <unordered_map>

#include "qtune/atomic_file.h"
#include "qtune/data.h"
#include "qtune/error.h"
#include "qtune/files.h"
#include "qtune/model_files.h"
#include "qtune/optimizer_shards.h"
#include "qtune/peft.h"
#include "qtune/safetensors.h"
#include "adamw_key.h"
#include "text_util.h"

namespace fs = std::filesystem;

namespace qtune {

namespace {

const char* kStateFile = "trainer_state.json";
const char* kTrainableFile = "trainable.safetensors";
const char* kOptimizerFile = "optimizer.safetensors";
const char* kAdapterFile = "adapter_model.safetensors";
const char* kLatestFile = "latest";

using detail::errno_text;


}  // namespace

// ---------------------------------------------------------------------------------------------
// State file and RNG

Json CheckpointState::to_json() const {
  return Json{{"format", kCheckpointFormat},
              {"version", kCheckpointVersion},
              {"step", step},
              {"loader", loader},
              {"progress", progress},
              {"identity", identity},
              {"tokenizer", tokenizer},
              {"storage", storage},
              {"rng", rng},
              {"torch_version", TORCH_VERSION},
              {"recipe", recipe}};
}

CheckpointState CheckpointState::from_json(const Json& j, const std::string& origin) {
  QTUNE_CHECK(j.is_object(), origin, ": expected a JSON object");
  const std::string format = j.value("format", "");
  QTUNE_CHECK(format == kCheckpointFormat, origin, ": not a qtune checkpoint (format '", format,
              "', expected '", kCheckpointFormat, "')");
  QTUNE_CHECK(j.contains("version") && j["version"].is_number_integer(), origin,
              ": missing integer \"version\"");
  const int version = j["version"].get<int>();
  QTUNE_CHECK(version == kCheckpointVersion, origin, ": checkpoint format version ", version,
              ", but this qtune reads version ", kCheckpointVersion,
              version > kCheckpointVersion
                  ? " (written by a newer qtune: upgrade qtune)"
                  : " (written by an older qtune: resume with that version)");
  auto need = [&](const char* key, bool (Json::*is)() const noexcept, const char* type) {
    QTUNE_CHECK(j.contains(key) && (j[key].*is)(), origin, ": \"", key, "\" must be ", type);
  };
  need("step", &Json::is_number_integer, "an integer");
  need("loader", &Json::is_object, "an object");
  need("rng", &Json::is_object, "an object");
  need("progress", &Json::is_object, "an object");
  need("identity", &Json::is_object, "an object");
  need("storage", &Json::is_object, "an object");
  need("recipe", &Json::is_object, "an object");
  CheckpointState s;
  s.step = j["step"].get<int64_t>();
  s.loader = j["loader"];
  s.rng = j["rng"];
  s.progress = j["progress"];
  s.identity = j["identity"];
  s.storage = j["storage"];
  s.recipe = j["recipe"];
  s.tokenizer = j.value("tokenizer", "");
  // Values a run could not have written are refused here, naming the file, not discovered steps
  // later as a diverged or misplaced run.
  QTUNE_CHECK(s.step >= 0, origin, ": \"step\" must be >= 0, got ", s.step);
  try {
    LoaderState::from_json(s.loader);
  } catch (const UserError& e) {
    throw UserError(origin + ": " + e.what());
  }
  const Json& p = s.progress;
  QTUNE_CHECK(!p.contains("tokens") || (p["tokens"].is_number_integer() &&
                                        p["tokens"].get<int64_t>() >= 0),
              origin, ": progress.tokens must be an integer >= 0, got ", p["tokens"].dump());
  for (const char* key :
       {"train_seconds", "first_val_loss", "best_val_loss", "last_val_loss"}) {
    if (!p.contains(key) || p[key].is_null()) continue;
    QTUNE_CHECK(p[key].is_number() && std::isfinite(p[key].get<double>()) &&
                    p[key].get<double>() >= 0,
                origin, ": progress.", key, " must be a finite number >= 0 (or null), got ",
                p[key].dump());
  }
  return s;
}

Json capture_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  torch::Tensor state;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    state = gen.get_state();
  }
  state = state.contiguous();
  static const char* digits = "0123456789abcdef";
  const auto* p = state.data_ptr<uint8_t>();
  std::string hex;
  hex.reserve(static_cast<size_t>(state.numel()) * 2);
  for (int64_t i = 0; i < state.numel(); ++i) {
    hex.push_back(digits[p[i] >> 4]);
    hex.push_back(digits[p[i] & 15]);
  }
  return Json{{"cpu", hex}};
}

void restore_rng_state(const Json& rng) {
  QTUNE_CHECK(rng.is_object() && rng.contains("cpu") && rng["cpu"].is_string(),
              "checkpoint rng: expected {\"cpu\": \"<hex>\"}");
  const std::string hex = rng["cpu"].get<std::string>();
  QTUNE_CHECK(hex.size() % 2 == 0, "checkpoint rng.cpu: odd number of hex digits");
  auto state = torch::empty({static_cast<int64_t>(hex.size() / 2)}, torch::kUInt8);
  auto* p = state.data_ptr<uint8_t>();
  auto nibble = [&](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    throw UserError(std::string("checkpoint rng.cpu: not a hex digit: '") + c + "'");
  };
  for (size_t i = 0; i < hex.size() / 2; ++i)
    p[i] = static_cast<uint8_t>(nibble(hex[2 * i]) << 4 | nibble(hex[2 * i + 1]));
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  try {
    gen.set_state(state);
  } catch (const c10::Error& e) {
    throw UserError(std::string("checkpoint rng.cpu: rejected by this LibTorch: ") +
                    e.what_without_backtrace());
  }
}

// ---------------------------------------------------------------------------------------------
// Fault injection for tests

namespace detail {

void debug_point(const std::string& point, int64_t step, const std::string& marker_dir,
                 bool (*interrupted)()) {
  const std::string here = point + "@" + std::to_string(step);
  auto armed = [&](const char* var) {
    const char* v = std::getenv(var);
    return v != nullptr && here == v;
  };
  if (armed("QTUNE_DEBUG_FAIL"))
    throw UserError("injected failure at " + here + " (QTUNE_DEBUG_FAIL)");
  if (!armed("QTUNE_DEBUG_PAUSE")) return;
  { std::ofstream((fs::path(marker_dir) / ".qtune-debug-paused").string()) << here << "\n"; }
  spdlog::warn("QTUNE_DEBUG_PAUSE: paused at {}", here);
  for (int i = 0; i < 30000; ++i) {  // 5 minutes at most: a test that forgot us must not hang
    if (interrupted != nullptr && interrupted()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Saving

namespace {

using detail::optimizer_key;
using detail::starts_with;

// step-<N> -> N; -1 for any other name.
int64_t step_of(const std::string& name) {
  if (!starts_with(name, "step-") || name.size() == 5) return -1;
  int64_t n = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9' || n > (INT64_MAX - 9) / 10) return -1;
    n = n * 10 + (name[i] - '0');
  }
  return n;
}

std::string make_temp_dir(const std::string& root, const std::string& stem) {
  std::string pattern = (fs::path(root) / (stem + "XXXXXX")).string();
  std::vector<char> buf(pattern.begin(), pattern.end());
  buf.push_back('\0');
  QTUNE_CHECK(::mkdtemp(buf.data()) != nullptr, "cannot create checkpoint directory ", pattern,
              ": ", errno_text());
  // mkdtemp makes it private (0700); a checkpoint is as readable as the other outputs.
  std::error_code ec;
  fs::permissions(buf.data(),
                  fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                      fs::perms::others_read | fs::perms::others_exec,
                  ec);
  return buf.data();
}

// Moves the complete directory `tmp` to `dest`. An existing `dest` (a checkpoint of the same
// step from an abandoned timeline, or a re-save) is swapped out atomically where the kernel
// can (renameat2 RENAME_EXCHANGE), so there is no moment without a step-<N>.
void publish_dir(const std::string& tmp, const std::string& dest, const std::string& root) {
  std::error_code ec;
  if (!fs::exists(dest, ec)) {
    QTUNE_CHECK(::rename(tmp.c_str(), dest.c_str()) == 0, "cannot rename ", tmp, " to ", dest, ": ",
                errno_text());
    return;
  }
#ifdef SYS_renameat2
  if (::syscall(SYS_renameat2, AT_FDCWD, tmp.c_str(), AT_FDCWD, dest.c_str(), RENAME_EXCHANGE) ==
      0) {
    fs::remove_all(tmp, ec);  // now the old checkpoint
    return;
  }
#endif
  const std::string old = make_temp_dir(root, "." + fs::path(dest).filename().string() + ".old-");
  fs::remove(old, ec);
  QTUNE_CHECK(::rename(dest.c_str(), old.c_str()) == 0, "cannot move ", dest,
              " aside: ", errno_text());
  QTUNE_CHECK(::rename(tmp.c_str(), dest.c_str()) == 0, "cannot rename ", tmp, " to ", dest, ": ",
              errno_text());
  fs::remove_all(old, ec);
}

void remove_leftovers(const std::string& root) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const std::string name = e.path().filename().string();
    if (starts_with(name, ".step-")) {
      spdlog::info("checkpoint: removing {} left by an interrupted save", e.path().string());
      fs::remove_all(e.path(), ec);
    }
  }
}

void prune(const std::string& root, int64_t newest, int64_t keep) {
  std::vector<int64_t> steps;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const int64_t n = step_of(e.path().filename().string());
    if (n >= 0 && n <= newest && e.is_directory()) steps.push_back(n);
  }
  std::sort(steps.rbegin(), steps.rend());
  for (size_t i = static_cast<size_t>(std::max<int64_t>(keep, 1)); i < steps.size(); ++i) {
    const auto dir = fs::path(root) / ("step-" + std::to_string(steps[i]));
    fs::remove_all(dir, ec);
    if (ec) spdlog::warn("checkpoint: cannot remove {}: {}", dir.string(), ec.message());
  }
}

}  // namespace

std::string save_checkpoint(const std::string& root, const LlamaForCausalLMImpl& model,
                            const torch::optim::AdamW& optimizer, const CheckpointState& state,
                            int64_t keep, const std::string& base_model) {
  std::error_code ec;
  fs::create_directories(root, ec);
  QTUNE_CHECK(!ec, "cannot create checkpoint directory ", root, ": ", ec.message());
  remove_leftovers(root);
  const std::string name = "step-" + std::to_string(state.step);
  const std::string dest = (fs::path(root) / name).string();
  const std::string tmp = make_temp_dir(root, "." + name + ".tmp-");
  try {
    CheckpointState st = state;
    st.storage = Json::object();
    const auto trainable = model.trainable_parameters();

    // Adapters go out in PEFT layout (the checkpoint is then also an adapter directory); any
    // trainable parameter no adapter state holds goes to trainable.safetensors by module path.
    std::unordered_map<const void*, std::string> in_adapter;
    const auto peft = peft_adapter_tensors(model);
    if (!peft.empty()) {
      save_peft_adapter(
          tmp, model, base_model,
          Json{{"identity", st.identity}, {"tokenizer", st.tokenizer}, {"step", st.step}});
      for (const auto& [key, t] : peft) in_adapter[t.unsafeGetTensorImpl()] = key;
    }
    std::map<std::string, torch::Tensor> rest;
    for (const auto& [path, p] : trainable) {
      auto it = in_adapter.find(p.unsafeGetTensorImpl());
      if (it != in_adapter.end()) {
        st.storage[path] = Json{{"file", kAdapterFile}, {"key", it->second}};
      } else {
        rest[path] = p.detach();
        st.storage[path] = Json{{"file", kTrainableFile}, {"key", path}};
      }
    }
    if (!rest.empty()) write_safetensors((fs::path(tmp) / kTrainableFile).string(), rest);

    std::map<std::string, torch::Tensor> moments;
    for (const auto& [path, p] : trainable) {
      const auto* s = adamw_state(optimizer, p);
      if (!s) continue;  // never stepped (no gradient yet)
      moments[path + ".exp_avg"] = s->exp_avg();
      moments[path + ".exp_avg_sq"] = s->exp_avg_sq();
      if (s->max_exp_avg_sq().defined()) moments[path + ".max_exp_avg_sq"] = s->max_exp_avg_sq();
      moments[path + ".step"] = torch::scalar_tensor(s->step(), torch::kLong);
    }
    write_safetensors((fs::path(tmp) / kOptimizerFile).string(), moments,
                      {{"format", "qtune-adamw"}});

    detail::debug_point("save", st.step, root);

    atomic_write_string((fs::path(tmp) / kStateFile).string(), st.to_json().dump(1) + "\n");
    fsync_directory(tmp);
    publish_dir(tmp, dest, root);
    fsync_directory(root);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  atomic_write_string((fs::path(root) / kLatestFile).string(), name + "\n");
  prune(root, state.step, keep);
  return dest;
}

// ---------------------------------------------------------------------------------------------
// Loading

bool is_checkpoint_dir(const std::string& dir) {
  std::error_code ec;
  return fs::is_regular_file(fs::path(dir) / kStateFile, ec);
}

std::string resolve_checkpoint(const std::string& spec, const std::string& root) {
  QTUNE_CHECK(!spec.empty(), "resume: no checkpoint given");
  if (spec != "latest") {
    fs::path p(spec);
    if (is_checkpoint_dir(p)) return p.string();
    // An output directory or its checkpoints/ folder: take its latest.
    if (fs::exists(p / "checkpoints"))
      return resolve_checkpoint("latest", (p / "checkpoints").string());
    if (fs::exists(p / kLatestFile)) return resolve_checkpoint("latest", p.string());
    throw UserError("resume: " + spec + " is not a checkpoint directory (no " + kStateFile +
                    " in it); give a checkpoints/step-<N> directory or 'latest'");
  }
  const fs::path pointer = fs::path(root) / kLatestFile;
  std::error_code ec;
  if (fs::exists(pointer, ec)) {
    std::string name = read_text_file(pointer.string());
    while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
    if (step_of(name) >= 0 && is_checkpoint_dir(fs::path(root) / name))
      return (fs::path(root) / name).string();
    spdlog::warn(
        "checkpoint: {} names '{}', which is not a complete checkpoint; using the newest "
        "one instead",
        pointer.string(), name);
  }
  int64_t best = -1;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const int64_t n = step_of(e.path().filename().string());
    if (n > best && is_checkpoint_dir(e.path())) best = n;
  }
  QTUNE_CHECK(best >= 0, "resume latest: no checkpoint in ", root,
              " (checkpoints are written every checkpoint.every steps and at the end)");
  return (fs::path(root) / ("step-" + std::to_string(best))).string();
}

CheckpointState read_checkpoint_state(const std::string& dir) {
  const std::string file = (fs::path(dir) / kStateFile).string();
  QTUNE_CHECK(fs::exists(file), "not a checkpoint directory: ", file, " is missing");
  return CheckpointState::from_json(read_json_file(file), file);
}

namespace {

class FileCache {
 public:
  explicit FileCache(std::string dir) : dir_(std::move(dir)) {}
  const SafetensorsFile& get(const std::string& file) {
    auto it = files_.find(file);
    if (it != files_.end()) return *it->second;
    QTUNE_CHECK(file.find('/') == std::string::npos && file.find("..") == std::string::npos, dir_,
                "/", kStateFile, ": storage names file '", file,
                "', expected a file name inside the checkpoint");
    const std::string path = (fs::path(dir_) / file).string();
    QTUNE_CHECK(fs::exists(path), "checkpoint ", dir_, " is incomplete: ", path, " is missing");
    return *(files_[file] = SafetensorsFile::open(path));
  }

 private:
  std::string dir_;
  std::map<std::string, std::shared_ptr<SafetensorsFile>> files_;
};

}  // namespace

void load_checkpoint_weights(const std::string& dir, const CheckpointState& state,
                             LlamaForCausalLMImpl& model) {
  FileCache files(dir);
  torch::NoGradGuard no_grad;
  std::set<std::string> seen;
  for (const auto& [path, p] : model.trainable_parameters()) {
    QTUNE_CHECK(state.storage.contains(path), "checkpoint ", dir, " has no parameter ", path,
                " (saved with other target modules or train type?)");
    const Json& where = state.storage[path];
    const std::string file = where.value("file", ""), key = where.value("key", "");
    const auto& st = files.get(file);
    QTUNE_CHECK(st.has(key), st.path(), ": missing tensor ", key, " (parameter ", path, ")");
    auto t = st.tensor(key);
    QTUNE_CHECK(t.sizes() == p.sizes(), st.path(), ": tensor ", key, " has shape ",
                shape_str(t.sizes()), ", but parameter ", path, " of this model has ",
                shape_str(p.sizes()));
    check_finite_weight(t, st.path(), key);
    p.copy_(t);
    seen.insert(path);
  }
  for (const auto& [path, _] : state.storage.items())
    QTUNE_CHECK(seen.count(path), "checkpoint ", dir, " holds parameter ", path,
                ", which is not trainable in this model (other target modules or train type?)");
}

void load_checkpoint_tensors(const std::string& dir, const CheckpointState& state,
                             LlamaForCausalLMImpl& model, torch::optim::AdamW& optimizer) {
  load_checkpoint_weights(dir, state, model);
  const std::string file = (fs::path(dir) / kOptimizerFile).string();
  QTUNE_CHECK(fs::exists(file), "checkpoint ", dir, " is incomplete: ", file, " is missing");
  auto st = SafetensorsFile::open(file);
  auto& opt_state = optimizer.state();
  // Moments are kept only for the parameters this optimizer steps (with dist.shard_optimizer,
  // this rank's own); every parameter's are checked.
  std::set<const void*> stepped;
  for (const auto& group : optimizer.param_groups())
    for (const auto& p : group.params()) stepped.insert(p.unsafeGetTensorImpl());
  std::set<std::string> used;
  for (const auto& named : model.trainable_parameters()) {
    // Not a structured binding: clang before 16 cannot capture one in the lambda below.
    const std::string& path = named.first;
    const torch::Tensor& p = named.second;
    if (!st->has(path + ".exp_avg")) continue;
    const bool keep = stepped.count(p.unsafeGetTensorImpl()) > 0;
    auto moment = [&](const std::string& suffix) {
      const std::string key = path + suffix;
      QTUNE_CHECK(st->has(key), file, ": missing tensor ", key);
      auto t = st->tensor(key);
      QTUNE_CHECK(t.sizes() == p.sizes(), file, ": tensor ", key, " has shape ",
                  shape_str(t.sizes()), ", expected ", shape_str(p.sizes()));
      check_finite_weight(t, file, key);
      QTUNE_CHECK(suffix == ".exp_avg" || !(t < 0).any().item<bool>(), file, ": tensor ", key,
                  " has negative values; a second moment is a mean of squares");
      used.insert(key);
      // A private copy: the mapping is read-only and AdamW updates its moments in place.
      return keep ? t.to(p.options(), /*non_blocking=*/false, /*copy=*/true) : torch::Tensor();
    };
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->exp_avg(moment(".exp_avg"));
    s->exp_avg_sq(moment(".exp_avg_sq"));
    if (st->has(path + ".max_exp_avg_sq")) s->max_exp_avg_sq(moment(".max_exp_avg_sq"));
    QTUNE_CHECK(st->has(path + ".step"), file, ": missing tensor ", path, ".step");
    const auto step_t = st->tensor(path + ".step");
    QTUNE_CHECK(step_t.numel() == 1, file, ": tensor ", path, ".step must hold one value");
    const int64_t step = step_t.item<int64_t>();
    QTUNE_CHECK(step >= 0 && step <= state.step, file, ": tensor ", path, ".step is ", step,
                ", expected 0 .. ", state.step, " (the checkpoint's step)");
    s->step(step);
    used.insert(path + ".step");
    if (keep) opt_state[optimizer_key(opt_state, p)] = std::move(s);
  }
  for (const auto& name : st->names())
    QTUNE_CHECK(used.count(name), file, ": tensor ", name,
                " belongs to no trainable parameter of this model");
}

}  // namespace qtune
