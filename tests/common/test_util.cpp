// Shared test helpers (see test_util.h).
#include "test_util.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "char_tokenizer.h"
#include "qtune/data.h"
#include "qtune/error.h"
#include "qtune/registry.h"

namespace fs = std::filesystem;

namespace qtune::test {

static std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

std::string data_path(const std::string& file) {
  std::string dir = env_or("QTUNE_DATA", env_or("QTUNE_DEFAULT_DATA", QTUNE_TEST_DATA_DIR));
  std::string path = file.empty() ? dir : (fs::path(dir) / file).string();
  if (!fs::exists(path)) {
    std::string msg = "test data missing: " + path +
                      " (the shared data folder must sit at ../shared/data beside the checkout, "
                      "or set QTUNE_DATA)";
    ADD_FAILURE() << msg;
    throw std::runtime_error(msg);
  }
  return path;
}

Registry& plugins() {
  static Registry* registry = [] {
    auto* r = new Registry();  // never destroyed: plugin code must outlive every use
    r->scan({plugin_dir()});
    return r;
  }();
  return *registry;
}

std::string build_dir() { return env_or("QTUNE_BUILD_DIR", QTUNE_TEST_BUILD_DIR); }
std::string source_dir() { return env_or("QTUNE_SOURCE_DIR", QTUNE_TEST_SOURCE_DIR); }
std::string bin_path(const std::string& program) { return build_dir() + "/bin/" + program; }
std::string plugin_dir() { return build_dir() + "/lib/qtune/plugins"; }

static std::vector<std::string>* dirs_ptr() {
  static auto* dirs = [] {
    auto* v = new std::vector<std::string>();
    std::atexit([] {
      std::error_code ec;
      if (!std::getenv("QTUNE_KEEP_TEMP"))
        for (const auto& d : *dirs_ptr()) fs::remove_all(d, ec);
    });
    return v;
  }();
  return dirs;
}

std::string temp_dir(const std::string& tag) {
  std::string pattern = (fs::temp_directory_path() / ("qtune-" + tag + "-XXXXXX")).string();
  std::vector<char> buf(pattern.begin(), pattern.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed for " + pattern);
  dirs_ptr()->push_back(buf.data());
  return buf.data();
}

pid_t spawn(const std::vector<std::string>& args, const std::vector<std::string>& env,
            const std::string& log) {
  pid_t pid = fork();
  if (pid == 0) {
    FILE* f = std::freopen(log.c_str(), "w", stdout);
    (void)f;
    dup2(fileno(stdout), fileno(stderr));
    for (const auto& kv : env) putenv(const_cast<char*>(kv.c_str()));
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    std::fprintf(stderr, "exec %s failed\n", argv[0]);
    _exit(127);
  }
  return pid;
}

RunResult run_program(const std::vector<std::string>& args, const std::vector<std::string>& env) {
  std::string out_file = temp_dir("run") + "/out.txt";
  const pid_t pid = spawn(args, env, out_file);
  int status = 0;
  waitpid(pid, &status, 0);
  RunResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.output = read_file(out_file);
  return r;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

ModelConfig tiny_config(int64_t hidden, bool tied) {
  ModelConfig c;
  c.hidden_size = hidden;
  c.intermediate_size = 40;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.vocab_size = 32;
  c.max_position_embeddings = 64;
  c.tie_word_embeddings = tied;
  return c;
}

namespace {
// The message of the UserError `f` throws; nullopt when it throws none. The one try/catch behind
// user_error_of, error_of and load_data_error, which differ only in what "none" gives.
std::optional<std::string> thrown_user_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const UserError& e) {
    return std::string(e.what());
  }
  return std::nullopt;
}
}  // namespace

std::string user_error_of(const std::function<void()>& f) {
  return thrown_user_error(f).value_or("(no error)");
}

std::vector<double> train_losses(const std::string& out_dir) {
  std::ifstream in(out_dir + "/metrics.jsonl");
  EXPECT_TRUE(in.good()) << "missing " << out_dir << "/metrics.jsonl";
  std::vector<double> l;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j["type"] != "train") continue;
    EXPECT_EQ(j["step"].get<size_t>(), l.size() + 1) << "train records out of order in " << out_dir;
    l.push_back(j["loss"].get<double>());
  }
  return l;
}

std::string error_of(const std::function<void()>& f) {
  auto message = thrown_user_error(f);
  if (!message) ADD_FAILURE() << "expected a UserError";
  return message.value_or("");
}

std::string write_temp_file(const std::string& tag, const std::string& name,
                            const std::string& content) {
  static std::map<std::string, std::string> dirs;
  auto it = dirs.find(tag);
  if (it == dirs.end()) it = dirs.emplace(tag, temp_dir(tag)).first;
  const std::string path = it->second + "/" + name;
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

std::string load_data_error(const DataConfig& c) {
  return thrown_user_error([&] { load_data(c, CharTokenizer()); }).value_or("");
}

TuningSpec lora_spec(torch::ScalarType dtype) {
  return TuningSpec::for_training(TrainType::kLora, dtype, plugins(), "", {}, false, "lora",
                                  Json{{"rank", 4}}, {"all-linear", "output"});
}

void expect_contains(const std::string& text, const std::string& part) {
  EXPECT_NE(text.find(part), std::string::npos) << "'" << part << "' not in: " << text;
}

}  // namespace qtune::test
