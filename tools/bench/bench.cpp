// qtune-bench, shared parts (see bench.h): result tables, option sets, synthetic configurations,
// machine information, CSV / markdown / gnuplot output, the report, and the helpers the
// sub-commands (bench_quant.cpp, bench_train.cpp) share: timing, threads, child processes.
#include "bench.h"

#include <ATen/Parallel.h>
#include <fcntl.h>
#include <spawn.h>
#include <spdlog/spdlog.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <torch/cuda.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "bench_internal.h"
#include "qtune/atomic_file.h"
#include "qtune/error.h"
#include "qtune/launcher.h"
#include "qtune/model.h"
#include "qtune/recipe.h"

extern char** environ;

namespace fs = std::filesystem;

namespace qtune {

// ---------------------------------------------------------------------------------------------
// BenchTable

namespace {

std::string format_number(double d, const char* fmt_g, int precision) {
  if (std::isnan(d)) return "";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  if (precision > 0 && std::fabs(d) >= std::pow(10.0, precision))
    std::snprintf(buf, sizeof buf, "%.0f", d);
  else
    std::snprintf(buf, sizeof buf, fmt_g, precision, d);
  return buf;
}

std::string csv_cell(const Json& v) {
  if (v.is_null()) return "";
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  if (v.is_number()) return format_number(v.get<double>(), "%.*g", 6);
  const std::string s = v.is_string() ? v.get<std::string>() : v.dump();
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

std::string md_cell(const Json& v, int precision) {
  if (v.is_null()) return "";
  if (v.is_boolean()) return v.get<bool>() ? "yes" : "no";
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  if (v.is_number()) {
    // Plain digits for large values; %g keeps `precision` significant digits otherwise.
    return format_number(v.get<double>(), "%.*g", precision);
  }
  std::string s = v.is_string() ? v.get<std::string>() : v.dump();
  std::string out;
  for (char c : s) {
    if (c == '|')
      out += "\\|";
    else if (c == '\n')
      out += ' ';
    else
      out += c;
  }
  return out;
}

}  // namespace

BenchTable::BenchTable(std::string name, std::string title, std::vector<BenchColumn> columns)
    : name_(std::move(name)), title_(std::move(title)), columns_(std::move(columns)) {}

size_t BenchTable::index(const std::string& column) const {
  for (size_t i = 0; i < columns_.size(); ++i)
    if (columns_[i].name == column) return i;
  throw std::logic_error("bench table " + name_ + " has no column " + column);
}

const Json& BenchTable::at(size_t row, const std::string& column) const {
  return rows_.at(row).at(index(column));
}

void BenchTable::add(const Json& row) {
  std::vector<Json> cells(columns_.size());
  for (const auto& [key, value] : row.items()) cells[index(key)] = value;
  rows_.push_back(std::move(cells));
}

std::string BenchTable::csv() const {
  std::ostringstream os;
  for (size_t i = 0; i < columns_.size(); ++i) os << (i ? "," : "") << columns_[i].name;
  os << "\n";
  for (const auto& r : rows_) {
    for (size_t i = 0; i < r.size(); ++i) os << (i ? "," : "") << csv_cell(r[i]);
    os << "\n";
  }
  return os.str();
}

std::string BenchTable::markdown() const {
  std::ostringstream os;
  if (!title_.empty()) os << "### " << title_ << "\n\n";
  std::vector<size_t> shown;
  for (size_t i = 0; i < columns_.size(); ++i)
    if (columns_[i].markdown) shown.push_back(i);
  os << "|";
  for (size_t i : shown) os << " " << columns_[i].name << " |";
  os << "\n|";
  for (size_t i : shown) {
    // Numbers right-aligned: pick by the first non-empty value of the column.
    bool numeric = false;
    for (const auto& r : rows_)
      if (!r[i].is_null()) {
        numeric = r[i].is_number();
        break;
      }
    os << (numeric ? "---:|" : "---|");
  }
  os << "\n";
  for (const auto& r : rows_) {
    os << "|";
    for (size_t i : shown) os << " " << md_cell(r[i], columns_[i].precision) << " |";
    os << "\n";
  }
  for (const auto& n : notes) os << "\n" << n << "\n";
  return os.str();
}

// ---------------------------------------------------------------------------------------------
// Option sets

namespace {

std::string json_value_text(const Json& v) {
  return v.is_string() ? v.get<std::string>() : v.dump();
}

std::string initials(const std::string& key) {
  if (key.find('_') == std::string::npos) return key;
  std::string out;
  bool start = true;
  for (char c : key) {
    if (c == '_') {
      start = true;
    } else if (start) {
      out += c;
      start = false;
    }
  }
  return out;
}

std::string make_label(const QuantSet& s, bool shorten) {
  std::string out = s.backend;
  std::vector<std::string> keys = s.key_order;
  for (const auto& [k, _] : s.options.items())
    if (std::find(keys.begin(), keys.end(), k) == keys.end()) keys.push_back(k);
  for (const auto& k : keys) {
    if (!s.options.contains(k)) continue;
    out += " " + (shorten ? initials(k) : k) + "=" + json_value_text(s.options.at(k));
  }
  return out;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

std::vector<std::string> quant_plugin_names(const Registry& registry) {
  std::vector<std::string> names;
  for (const auto& p : registry.plugins())
    if (p.kind == "quant") names.push_back(p.name);
  return names;
}

std::string join(const std::vector<std::string>& v, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? sep : "") + v[i];
  return out;
}

}  // namespace

std::string QuantSet::label() const { return make_label(*this, false); }
std::string QuantSet::short_label() const { return make_label(*this, true); }

std::vector<QuantSet> parse_quant_sets(const std::string& text, const std::string& flag) {
  std::vector<QuantSet> sets;
  for (auto& e : parse_option_sets(text, flag)) {
    QuantSet s;
    s.backend = std::move(e.name);
    s.options = std::move(e.options);
    s.key_order = std::move(e.key_order);
    sets.push_back(std::move(s));
  }
  return sets;
}

std::vector<QuantSet> select_quant_sets(const std::vector<QuantSet>& wanted,
                                        const Registry& registry, bool from_defaults,
                                        const std::string& flag) {
  const auto names = quant_plugin_names(registry);
  auto known = [&](const std::string& n) {
    return std::find(names.begin(), names.end(), n) != names.end();
  };
  std::vector<QuantSet> out;
  std::vector<std::string> mentioned;
  for (const auto& s : wanted) {
    mentioned.push_back(s.backend);
    if (known(s.backend)) {
      out.push_back(s);
      continue;
    }
    QTUNE_CHECK(from_defaults, flag, ": no quantization plugin '", s.backend,
                "' was found (found: ", names.empty() ? std::string("none") : join(names, ", "),
                "); check --plugin_dir / QTUNE_PLUGIN_PATH");
    spdlog::warn("bench: default option set '{}' skipped: no plugin '{}' loaded", s.label(),
                 s.backend);
  }
  if (from_defaults)
    for (const auto& n : names)
      if (std::find(mentioned.begin(), mentioned.end(), n) == mentioned.end())
        out.push_back(QuantSet{n, Json::object(), {}});
  return out;
}

ModelConfig synthetic_config(const std::string& size, const std::string& flag) {
  // "<name>:<layers>": the named shapes with fewer decoder layers (per-layer costs at full width
  // without writing and training the whole model).
  std::string name = size;
  int64_t layers_override = 0;
  if (const auto colon = size.find(':'); colon != std::string::npos) {
    name = size.substr(0, colon);
    const std::string n = size.substr(colon + 1);
    const bool digits = !n.empty() && n.size() <= 4 &&
                        std::all_of(n.begin(), n.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
    layers_override = digits ? std::stoll(n) : 0;
    QTUNE_CHECK(layers_override > 0, flag, ": '", size,
                "': expected <size>:<layers> with layers a positive integer");
  }
  ModelConfig c;
  c.vocab_size = 32000;
  c.max_position_embeddings = 2048;
  c.tie_word_embeddings = true;
  auto set = [&](int64_t hidden, int64_t layers, int64_t heads, int64_t kv, int64_t inter) {
    c.hidden_size = hidden;
    c.num_hidden_layers = layers;
    c.num_attention_heads = heads;
    c.num_key_value_heads = kv;
    c.intermediate_size = inter;
  };
  if (name == "tiny") {
    set(64, 2, 4, 4, 172);
    c.vocab_size = 512;
    c.max_position_embeddings = 512;
  } else if (name == "15M") {
    set(288, 6, 6, 6, 768);  // llama2.c stories15M
  } else if (name == "60M") {
    set(512, 14, 8, 8, 1376);  // stories42M's width, 14 layers
  } else if (name == "250M") {
    set(1024, 17, 16, 16, 2816);
  } else if (name == "1B") {
    set(2048, 22, 32, 4, 5632);  // TinyLlama-1.1B: GQA, untied head
    c.tie_word_embeddings = false;
  } else if (name == "7B") {
    set(4096, 32, 32, 32, 11008);  // Llama-2-7B: multi-head attention, untied head
    c.tie_word_embeddings = false;
    c.max_position_embeddings = 4096;
  } else {
    throw UserError(flag + ": unknown synthetic model size '" + name +
                    "', expected one of tiny, 15M, 60M, 250M, 1B, 7B (optionally :<layers>)");
  }
  if (layers_override > 0) {
    QTUNE_CHECK(layers_override <= c.num_hidden_layers, flag, ": '", size, "': ",
                layers_override, " layers, at most ", c.num_hidden_layers, " for ", name);
    c.num_hidden_layers = layers_override;
  }
  c.validate(flag + " " + name);
  return c;
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the sub-commands

namespace bench_detail {

void sync(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

double median(std::vector<double> v) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double median_seconds(const std::function<void()>& fn, int warmup, int repeats,
                      const torch::Device& device) {
  using clock = std::chrono::steady_clock;
  for (int i = 0; i < warmup; ++i) fn();
  sync(device);
  std::vector<double> t;
  for (int i = 0; i < std::max(1, repeats); ++i) {
    const auto t0 = clock::now();
    fn();
    sync(device);
    t.push_back(std::chrono::duration<double>(clock::now() - t0).count());
  }
  return median(t);
}

std::pair<double, double> paired_medians(const std::function<void()>& a,
                                         const std::function<void()>& b, int warmup, int repeats,
                                         const torch::Device& device) {
  using clock = std::chrono::steady_clock;
  for (int i = 0; i < warmup; ++i) {
    a();
    b();
  }
  sync(device);
  std::vector<double> ta, tb;
  for (int i = 0; i < std::max(1, repeats); ++i) {
    for (int which = 0; which < 2; ++which) {
      const auto t0 = clock::now();
      (which == 0 ? a : b)();
      sync(device);
      (which == 0 ? ta : tb).push_back(std::chrono::duration<double>(clock::now() - t0).count());
    }
  }
  return {median(ta), median(tb)};
}

int apply_threads(int threads) {
  const int n =
      threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(n);
  return at::get_num_threads();
}

std::string last_line(const std::string& path) {
  std::ifstream in(path);
  std::string line, last;
  while (std::getline(in, line)) {
    // Progress bars rewrite one line with '\r': keep what follows the last one.
    const auto cr = line.find_last_of('\r');
    if (cr != std::string::npos) line = line.substr(cr + 1);
    if (!trim(line).empty()) last = trim(line);
  }
  if (last.size() > 300) last = last.substr(0, 297) + "...";
  return last;
}

WorkDir::WorkDir(const BenchOptions& options) {
  if (!options.work_dir.empty()) {
    path_ = options.work_dir;
    std::error_code ec;
    fs::create_directories(path_, ec);
    QTUNE_CHECK(!ec, "--work_dir: cannot create ", path_, ": ", ec.message());
    return;
  }
  std::string tmpl = (fs::temp_directory_path() / "qtune-bench-XXXXXX").string();
  QTUNE_CHECK(mkdtemp(tmpl.data()) != nullptr, "cannot create a temporary folder ", tmpl, ": ",
              std::strerror(errno));
  path_ = tmpl;
  remove_ = !options.keep_runs;
  if (!remove_) spdlog::info("bench: run folders kept in {}", path_);
}

WorkDir::~WorkDir() {
  if (!remove_) return;
  std::error_code ec;
  fs::remove_all(path_, ec);
}

std::string first_line(const std::exception& e) {
  std::string what = e.what();
  if (const auto* ce = dynamic_cast<const c10::Error*>(&e)) what = ce->what_without_backtrace();
  return what.substr(0, what.find('\n'));
}

std::string slug(const std::string& text) {
  std::string out;
  for (char c : text) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (std::isalnum(u) || c == '.' || c == '-')
      out += c;
    else if (!out.empty() && out.back() != '_')
      out += '_';
  }
  while (!out.empty() && out.back() == '_') out.pop_back();
  return out.empty() ? "run" : out;
}

std::string gp_quote(const std::string& text) {
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

std::string gp_datablock(const std::string& name, const BenchTable& table,
                         const std::vector<std::string>& columns,
                         const std::function<bool(size_t)>& keep) {
  std::ostringstream os;
  os << "$" << name << " << EOD\n";
  for (size_t r = 0; r < table.rows().size(); ++r) {
    if (keep && !keep(r)) continue;
    for (size_t c = 0; c < columns.size(); ++c) {
      const Json& v = table.at(r, columns[c]);
      os << (c ? " " : "");
      if (v.is_string()) {
        std::string s = v.get<std::string>();
        std::replace(s.begin(), s.end(), '"', '\'');
        os << '"' << s << '"';
      } else if (v.is_number()) {
        const double d = v.get<double>();
        if (std::isfinite(d)) {
          char buf[64];
          std::snprintf(buf, sizeof buf, "%.6g", d);
          os << buf;
        } else {
          os << "NaN";
        }
      } else if (v.is_boolean()) {
        os << (v.get<bool>() ? 1 : 0);
      } else {
        os << "NaN";
      }
    }
    os << "\n";
  }
  os << "EOD\n";
  return os.str();
}

std::string gp_preamble(const std::string& png, int width, int height) {
  std::ostringstream os;
  os << "# Drawn by qtune-bench; re-run with `gnuplot " << png.substr(0, png.size() - 4)
     << ".gp` in this folder (scripts/plot_bench.sh does every plot).\n"
     << "set terminal pngcairo size " << width << "," << height
     << " enhanced font 'DejaVu Sans,10'\n"
     << "set output " << gp_quote(png) << "\n"
     << "set encoding utf8\nset grid lc rgb '#dddddd'\nset key noenhanced\n"
     << "set termoption noenhanced\n";
  return os.str();
}

std::shared_ptr<AdapterFactory> pick_adapter(const BenchOptions& options,
                                             const Registry& registry) {
  if (!options.adapter.empty()) return registry.adapter(options.adapter);
  // The recipe's default adapter (lora) when it is there: plugins are listed by name, and a
  // second adapter (dora) would otherwise change what every benchmark measures.
  const std::string preferred = Recipe::from_json(recipe_defaults()).adapter.name;
  for (const auto& p : registry.plugins())
    if (p.kind == "adapter" && p.name == preferred) return registry.adapter(p.name);
  for (const auto& p : registry.plugins())
    if (p.kind == "adapter") return registry.adapter(p.name);
  throw UserError(
      "no adapter plugin was found (lora / qlora need one); check --plugin_dir / "
      "QTUNE_PLUGIN_PATH");
}

}  // namespace bench_detail

// ---------------------------------------------------------------------------------------------
// Validation

void validate_bench_options(const BenchOptions& o, const Registry& registry,
                            const std::string& command) {
  const bool all = command == "all";
  const bool quant = all || command == "quant", ppl = all || command == "ppl";
  const bool finetune = all || command == "finetune", scale = all || command == "scale";
  QTUNE_CHECK(o.repeats >= 1, "--repeats must be >= 1, got ", o.repeats);
  QTUNE_CHECK(o.warmup >= 0, "--warmup must be >= 0, got ", o.warmup);
  QTUNE_CHECK(o.threads >= 0, "--threads must be >= 0, got ", o.threads);
  QTUNE_CHECK(!o.out_dir.empty(), "--out must not be empty");
  bool uses_model = ppl || finetune;
  if (quant) {
    QTUNE_CHECK(!o.matrices.empty(), "--matrices: no matrix given");
    for (const auto& m : o.matrices)
      uses_model |= bench_detail::parse_matrix_spec(m).kind == "model";
    QTUNE_CHECK(o.linear_tokens > 0, "--tokens must be > 0, got ", o.linear_tokens);
  }
  if (uses_model) {
    resolve_data_path(o.model_path, "--model");
    if (!o.tokenizer_path.empty()) resolve_data_path(o.tokenizer_path, "--tokenizer");
  }
  if (ppl) {
    resolve_data_path(o.ppl_text, "--ppl_text");
    QTUNE_CHECK(o.ppl_seq_len >= 0, "--ppl_seq_len must be >= 0, got ", o.ppl_seq_len);
    QTUNE_CHECK(o.ppl_max_blocks >= 0, "--ppl_max_blocks must be >= 0, got ", o.ppl_max_blocks);
    QTUNE_CHECK(o.ppl_scoring == "stream" || o.ppl_scoring == "llama",
                "--ppl_scoring must be stream or llama, got '", o.ppl_scoring, "'");
  }
  if (finetune) {
    resolve_data_path(o.finetune_data, "--finetune_data");
    QTUNE_CHECK(o.finetune_steps > 0, "--finetune_steps must be > 0, got ", o.finetune_steps);
    QTUNE_CHECK(o.finetune_batch > 0, "--finetune_batch must be > 0, got ", o.finetune_batch);
    QTUNE_CHECK(o.finetune_seq_len > 0, "--finetune_seq_len must be > 0, got ", o.finetune_seq_len);
    QTUNE_CHECK(o.finetune_lr > 0 && o.finetune_full_lr > 0,
                "--finetune_lr and --finetune_full_lr must be > 0");
    QTUNE_CHECK(o.finetune_eval_every >= 0, "--finetune_eval_every must be >= 0, got ",
                o.finetune_eval_every);
    parse_dtype(o.finetune_dtype, "--finetune_dtype");
    QTUNE_CHECK(o.device.is_cpu(), "--device ", o.device.str(),
                ": finetune runs the trainer, which trains on the CPU; use --device cpu");
    QTUNE_CHECK(!o.finetune_ranks.empty(), "--finetune_ranks: no rank count given");
    for (int64_t n : o.finetune_ranks)
      QTUNE_CHECK(n >= 1 && n <= 64 && o.finetune_batch % n == 0, "--finetune_ranks: ", n,
                  " ranks must be in [1, 64] and divide --finetune_batch ", o.finetune_batch,
                  " (each rank takes its share of the same global batch)");
    if (!o.finetune_size.empty()) synthetic_config(o.finetune_size, "--finetune_size");
  }
  if (scale) {
    QTUNE_CHECK(!o.scale_sizes.empty(), "--scale_sizes: no size given");
    for (const auto& n : o.scale_sizes) {
      const ModelConfig c = synthetic_config(n, "--scale_sizes");
      QTUNE_CHECK(o.scale_seq_len <= c.max_position_embeddings, "--scale_seq_len ", o.scale_seq_len,
                  " exceeds size ", n, "'s max_position_embeddings ", c.max_position_embeddings);
    }
    QTUNE_CHECK(!o.scale_dtypes.empty(), "--scale_dtypes: no dtype given");
    for (const auto& d : o.scale_dtypes) parse_dtype(d, "--scale_dtypes");
    QTUNE_CHECK(o.scale_steps > 0, "--scale_steps must be > 0, got ", o.scale_steps);
    QTUNE_CHECK(o.scale_batch > 0 && o.scale_seq_len > 0,
                "--scale_batch and --scale_seq_len must be > 0");
  }
  if (finetune || scale) {
    auto adapter = bench_detail::pick_adapter(o, registry);
    adapter->check_options(o.adapter_options, "--adapter_options");
    QTUNE_CHECK(!o.self_exe.empty(), "bench: the path of qtune-bench itself is unknown");
  }
}

// ---------------------------------------------------------------------------------------------
// Child processes

bool is_bench_child_command(const std::string& command) {
  return command == "__finetune" || command == "__finetune_ranks" || command == "__scale" ||
         command == "__scale_ranks" || command == "__synthesize";
}

int bench_child_main(const std::vector<std::string>& args, const Registry& registry) {
  QTUNE_CHECK(!args.empty() && is_bench_child_command(args[0]), "not a bench child command");
  if (args[0] == "__finetune") {
    QTUNE_CHECK(args.size() == 2, "usage: __finetune RECIPE.json");
    return bench_detail::finetune_child(args[1], registry);
  }
  if (args[0] == "__finetune_ranks" || args[0] == "__scale_ranks") {
    const bool scale = args[0] == "__scale_ranks";
    QTUNE_CHECK(args.size() == (scale ? 4u : 3u), "usage: __finetune_ranks N RECIPE.json | "
                "__scale_ranks N SPEC.json RESULT.json");
    LaunchOptions l;
    l.nproc = std::stoll(args[1]);
    const std::string self = fs::read_symlink("/proc/self/exe").string();
    if (scale) return launch_local_ranks({self, "__scale", args[2], args[3]}, l);
    return launch_local_ranks({self, "__finetune", args[2]}, l);
  }
  if (args[0] == "__synthesize") {
    QTUNE_CHECK(args.size() == 2, "usage: __synthesize SPEC.json");
    return bench_detail::synthesize_child(args[1]);
  }
  QTUNE_CHECK(args.size() == 3, "usage: __scale SPEC.json RESULT.json");
  return bench_detail::scale_child(args[1], args[2], registry);
}

// ---------------------------------------------------------------------------------------------
// Machine information and output

namespace {

std::string read_first(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key, 0) != 0) continue;
    const auto colon = line.find(':');
    if (colon != std::string::npos) return trim(line.substr(colon + 1));
  }
  return "";
}

std::string shell_quote(const std::string& a) {
  if (!a.empty() && a.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                        "0123456789_-./=:,+@%") == std::string::npos)
    return a;
  std::string q = "'";
  for (char c : a) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

const char* section_title(const std::string& command) {
  if (command == "quant") return "quant: quantization backends on real and synthetic matrices";
  if (command == "ppl") return "ppl: perplexity of a quantized base model";
  if (command == "finetune") return "finetune: the same short fine-tune, full vs LoRA vs QLoRA";
  if (command == "scale") return "scale: LoRA vs QLoRA memory and step time as the model grows";
  return "results";
}

const std::vector<std::string>& section_order() {
  static const std::vector<std::string> order{"quant", "ppl", "finetune", "scale"};
  return order;
}

// Prefixes relative link targets ("](x.png)") with `prefix`.
std::string rewrite_links(const std::string& md, const std::string& prefix) {
  if (prefix.empty()) return md;
  std::string out;
  size_t pos = 0;
  while (true) {
    const size_t at = md.find("](", pos);
    if (at == std::string::npos) break;
    out += md.substr(pos, at + 2 - pos);
    const size_t end = md.find(')', at + 2);
    const std::string target = md.substr(at + 2, end == std::string::npos ? 0 : end - at - 2);
    const bool relative = !target.empty() && target[0] != '#' && target[0] != '/' &&
                          target.find("://") == std::string::npos;
    if (relative) out += prefix;
    pos = at + 2;
  }
  return out + md.substr(pos);
}

}  // namespace

double machine_memory_bytes() {
  const std::string mem = read_first("/proc/meminfo", "MemTotal");  // "24568316 kB"
  return mem.empty() ? 0.0 : std::atof(mem.c_str()) * 1024.0;
}

Json bench_machine_info(const BenchOptions& options) {
  Json m;
  m["cpu"] = read_first("/proc/cpuinfo", "model name");
  m["cores"] = static_cast<int64_t>(sysconf(_SC_NPROCESSORS_ONLN));
  m["memory_gib"] = machine_memory_bytes() / (1024.0 * 1024.0 * 1024.0);
  struct utsname u {};
  if (uname(&u) == 0) m["os"] = std::string(u.sysname) + " " + u.release + " " + u.machine;
  m["torch"] = TORCH_VERSION;
  m["threads"] = bench_detail::apply_threads(options.threads);
  m["device"] = options.device.str();
  std::ifstream la("/proc/loadavg");
  double l1 = 0, l5 = 0, l15 = 0;
  la >> l1 >> l5 >> l15;
  m["load_avg"] = {l1, l5, l15};
  const std::time_t now = std::time(nullptr);
  char date[64];
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  m["date"] = date;
  std::vector<std::string> cmd;
  for (size_t i = 0; i < options.command_line.size(); ++i) {
    std::string a = options.command_line[i];
    if (i == 0) a = fs::path(a).filename().string();
    cmd.push_back(shell_quote(a));
  }
  m["command"] = join(cmd, " ");
  // Settings outside the command line that change the timings.
  std::vector<std::string> env;
  for (const char* k : {"OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                        "OPENBLAS_NUM_THREADS", "QTUNE_SYSTEM_MALLOC"})
    if (const char* v = std::getenv(k)) env.push_back(std::string(k) + "=" + v);
  m["env"] = join(env, " ");
  return m;
}

bool gnuplot_available() {
  const char* path = std::getenv("PATH");
  std::stringstream ss(path ? path : "/usr/bin:/bin");
  for (std::string dir; std::getline(ss, dir, ':');) {
    if (dir.empty()) continue;
    if (access((fs::path(dir) / "gnuplot").c_str(), X_OK) == 0) return true;
  }
  return false;
}

std::string write_bench_result(const BenchResult& result, const BenchOptions& options) {
  std::error_code ec;
  fs::create_directories(options.out_dir, ec);
  QTUNE_CHECK(!ec, "--out: cannot create ", options.out_dir, ": ", ec.message());
  const fs::path out(options.out_dir);
  const Json m = bench_machine_info(options);

  std::ostringstream md;
  md << "## " << section_title(result.command) << "\n\n";
  char took[64];
  std::snprintf(took, sizeof took, "%.0f s", result.seconds);
  md << "Run " << m["date"].get<std::string>() << " on " << m["cpu"].get<std::string>() << " ("
     << m["cores"] << " cores, " << m["threads"] << " threads, load "
     << m["load_avg"][0].get<double>() << "), device " << m["device"].get<std::string>()
     << ", took " << took << ":\n`"
     << (m["env"].get<std::string>().empty() ? "" : m["env"].get<std::string>() + " ")
     << m["command"].get<std::string>() << "`\n\n";

  for (const auto& t : result.tables) {
    atomic_write_string((out / (t.name() + ".csv")).string(), t.csv());
    if (!t.csv_only) md << t.markdown() << "\n";
    md << "CSV: [" << t.name() << ".csv](" << t.name() << ".csv)"
       << (t.csv_only && !t.title().empty() ? " (" + t.title() + ")" : "") << "\n\n";
  }

  const bool have_gnuplot = gnuplot_available();
  for (const auto& p : result.plots) {
    const std::string gp = (out / (p.name + ".gp")).string();
    atomic_write_string(gp, p.script);
    if (!have_gnuplot) continue;
    const std::string log = (out / (p.name + ".gnuplot.log")).string();
    fs::remove(log, ec);
    const fs::path abs_out = fs::absolute(out);
    const int rc = run_child(
        "gnuplot",
        {"-e", "cd " + bench_detail::gp_quote(abs_out.string()), fs::absolute(gp).string()}, log);
    if (rc != 0) {
      spdlog::warn("bench: gnuplot failed on {}: {}", gp, bench_detail::last_line(log));
      md << "(plot " << p.name << " failed: " << bench_detail::last_line(log) << ")\n\n";
      continue;
    }
    fs::remove(log, ec);
    md << "![" << p.title << "](" << p.name << ".png)\n\n";
  }
  if (!have_gnuplot && !result.plots.empty())
    md << "(plots skipped: gnuplot was not found on PATH; the scripts are in this folder, run "
          "scripts/plot_bench.sh after installing gnuplot-nox)\n\n";
  if (!have_gnuplot && !result.plots.empty())
    spdlog::warn("bench: gnuplot not found: plots skipped (CSV and markdown written)");

  const std::string section = md.str();
  atomic_write_string((out / (result.command + ".md")).string(), section);
  return section;
}

void write_bench_report(const BenchOptions& options, const std::string& doc_path) {
  const fs::path out(options.out_dir);
  const Json m = bench_machine_info(options);
  std::ostringstream body;
  char mem[32];
  std::snprintf(mem, sizeof mem, "%.1f", m["memory_gib"].get<double>());
  body << "Generated by `qtune-bench` on " << m["date"].get<std::string>() << ".\n\n"
       << "- Machine: " << m["cpu"].get<std::string>() << ", " << m["cores"] << " cores, " << mem
       << " GiB memory, " << m.value("os", std::string("?")) << "\n"
       << "- LibTorch " << m["torch"].get<std::string>() << ", " << m["threads"]
       << " intra-op threads, device " << m["device"].get<std::string>() << "\n"
       << "- Command: `"
       << (m["env"].get<std::string>().empty() ? "" : m["env"].get<std::string>() + " ")
       << m["command"].get<std::string>() << "`\n\n"
       << "Each section below states its own run (date, command, load); sections not re-run "
          "keep their previous results.\n\n";
  // Every section in the folder: this run's, and earlier ones this run did not redo.
  for (const auto& name : section_order()) {
    const fs::path p = out / (name + ".md");
    std::ifstream in(p);
    if (!in) continue;
    std::stringstream ss;
    ss << in.rdbuf();
    body << ss.str() << "\n";
  }
  atomic_write_string((out / "report.md").string(), "# qtune-bench report\n\n" + body.str());

  if (doc_path.empty()) return;
  std::ifstream in(doc_path);
  QTUNE_CHECK(in.good(), "--doc: cannot read ", doc_path);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string doc = ss.str();
  const std::string begin = "<!-- qtune-bench:begin -->", end = "<!-- qtune-bench:end -->";
  const auto b = doc.find(begin), e = doc.find(end);
  QTUNE_CHECK(b != std::string::npos && e != std::string::npos && b < e, "--doc: ", doc_path,
              " has no '", begin, "' ... '", end, "' section to replace");
  std::string rel =
      fs::relative(fs::absolute(out), fs::absolute(fs::path(doc_path)).parent_path()).string();
  if (!rel.empty() && rel.back() != '/') rel += "/";
  if (rel == "./") rel.clear();
  // Headings one level down: the page has its own title.
  std::string generated = rewrite_links(body.str(), rel);
  std::string shifted;
  std::istringstream lines(generated);
  for (std::string line; std::getline(lines, line);)
    shifted += (line.rfind("#", 0) == 0 ? "#" + line : line) + "\n";
  const std::string updated = doc.substr(0, b + begin.size()) + "\n" + shifted + doc.substr(e);
  atomic_write_string(doc_path, updated);
  spdlog::info("bench: updated the generated section of {}", doc_path);
}

}  // namespace qtune
