// The fuzz target bodies (see fuzz_entries.h). Each one is the shortest path from bytes to a
// public loader and back out through the values it returns; files it needs beside the fuzzed
// one (a tiny model, shards) are written once per process into the scratch folder.
#include "fuzz_entries.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "char_tokenizer.h"
#include "qtune/data.h"
#include "qtune/error.h"
#include "qtune/llama2c.h"
#include "qtune/model_config.h"
#include "qtune/model_files.h"
#include "qtune/peft.h"
#include "qtune/plugin_stamp.h"
#include "qtune/recipe.h"
#include "qtune/safetensors.h"
#include "qtune/state_layout.h"
#include "qtune/tokenizer.h"
#include "qtune/weight_source.h"

namespace fs = std::filesystem;

namespace qtune::fuzz {
namespace {

// ---------------------------------------------------------------------------------------------
// Scratch files

void remove_scratch() {
  std::error_code ec;
  fs::remove_all(scratch_dir(), ec);
}

// `sub`/`name` under the scratch folder, holding exactly the given bytes.
std::string put(const std::string& sub, const std::string& name, const void* data, size_t size) {
  const fs::path dir = fs::path(scratch_dir()) / sub;
  fs::create_directories(dir);
  const fs::path p = dir / name;
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  f.close();
  if (!f) throw std::runtime_error("fuzz: cannot write " + p.string());
  return p.string();
}

std::string put(const std::string& sub, const std::string& name, const std::string& text) {
  return put(sub, name, text.data(), text.size());
}

// The input cut at its first NUL byte: (before, after); after is empty without a NUL.
std::pair<std::string, std::string> split_at_nul(const uint8_t* data, size_t size) {
  const std::string all(reinterpret_cast<const char*>(data), size);
  const size_t nul = all.find('\0');
  if (nul == std::string::npos) return {all, ""};
  return {all.substr(0, nul), all.substr(nul + 1)};
}

// A model small enough to write per input: 1 layer, hidden 8, 2 heads sharing 1 KV head.
ModelConfig tiny_config() {
  ModelConfig c;
  c.hidden_size = 8;
  c.intermediate_size = 16;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.vocab_size = 16;
  c.max_position_embeddings = 32;
  c.tie_word_embeddings = true;
  return c;
}

std::map<std::string, torch::Tensor> tiny_weights() {
  std::map<std::string, torch::Tensor> w;
  for (const auto& [name, shape] : llama_weight_shapes(tiny_config()))
    w[name] = torch::full(shape, 0.25f);
  return w;
}

// Reads every tensor a WeightSource lists (shape and data), as a loader would.
void touch_weights(const WeightSource& w) {
  for (const auto& n : w.names()) {
    (void)w.shape(n);
    if (w.has_quantized(n)) {
      (void)w.quantized(n);
      continue;
    }
    if (w.has(n)) (void)w.get(n, torch::kFloat32).sum().item<float>();
  }
}

// Calls `f`, letting a UserError end only this step: one bad tensor must not hide the others.
template <typename F>
void step(F&& f) {
  try {
    f();
  } catch (const UserError&) {
  }
}

// ---------------------------------------------------------------------------------------------
// Targets

// A whole .safetensors file: header, offsets, every tensor's bytes.
void fuzz_safetensors(const uint8_t* data, size_t size) {
  auto f = SafetensorsFile::open(put("safetensors", "x.safetensors", data, size));
  (void)f->metadata();
  for (const auto& n : f->names()) {
    const SafetensorsTensorInfo& info = f->info(n);
    if (info.nbytes() > 0) {
      const uint8_t* p = f->raw(n);
      volatile uint8_t sink = p[0] ^ p[info.nbytes() - 1];
      (void)sink;
    }
    step([&] { (void)f->tensor(n).to(torch::kFloat64).sum().item<double>(); });
  }
}

// model.safetensors.index.json beside two valid shards (a.safetensors: x, y; b.safetensors: z).
void fuzz_safetensors_index(const uint8_t* data, size_t size) {
  static const bool shards = [] {
    const std::string dir = (fs::path(scratch_dir()) / "index").string();
    fs::create_directories(dir);
    write_safetensors(dir + "/a.safetensors",
                      {{"x", torch::ones({2, 3})}, {"y", torch::ones({4})}});
    write_safetensors(dir + "/b.safetensors", {{"z", torch::ones({3, 2}, torch::kBFloat16)}});
    return true;
  }();
  (void)shards;
  put("index", "model.safetensors.index.json", data, size);
  auto w = SafetensorsWeightSource::open_dir((fs::path(scratch_dir()) / "index").string());
  (void)w->metadata();
  touch_weights(*w);
}

// An HF config.json beside the weights of tiny_config(): the config parser, the quantization
// dispatch and the check of the weights against the shapes the config asks for.
void fuzz_hf_config(const uint8_t* data, size_t size) {
  static const bool weights = [] {
    const std::string dir = (fs::path(scratch_dir()) / "hf").string();
    fs::create_directories(dir);
    write_safetensors(dir + "/model.safetensors", tiny_weights());
    return true;
  }();
  (void)weights;
  put("hf", "config.json", data, size);
  ModelFiles m = open_model((fs::path(scratch_dir()) / "hf").string());
  m.config.validate("fuzz");
  (void)m.config.to_hf_json();
  touch_weights(*m.weights);
}

// A llama2.c .bin checkpoint: header, size check, every tensor (q/k permuted).
void fuzz_llama2c(const uint8_t* data, size_t size) {
  auto ck = Llama2cCheckpoint::open(put("llama2c", "model.bin", data, size));
  ModelConfig c = ck->config();
  c.validate("fuzz");
  touch_weights(*ck);
}

void use_tokenizer(const Tokenizer& t) {
  (void)t.vocab_size();
  for (const std::string& text : {std::string(), std::string("Once upon a time, a tiny cat."),
                                  std::string("\xe2\x96\x81\xff<0x41> <s></s>\n\t")}) {
    const std::vector<int> ids = t.encode(text, true, true);
    (void)t.decode(ids);
  }
  const int64_t n = std::min<int64_t>(t.vocab_size(), 4096);
  for (int64_t i = 0; i < n; ++i) (void)t.decode_token(static_cast<int>(i ? i - 1 : -1), i);
}

// A llama2.c tok*.bin tokenizer.
void fuzz_tokenizer_bin(const uint8_t* data, size_t size) {
  use_tokenizer(*load_tokenizer(put("tokbin", "tok.bin", data, size)));
}

// A tokenizer.model: a sentencepiece protobuf (through the sentencepiece module) or tiktoken
// rank lines, told apart by the loader from the first bytes.
void fuzz_tokenizer_model(const uint8_t* data, size_t size) {
  use_tokenizer(*load_tokenizer(put("tokmodel", "tokenizer.model", data, size)));
}

// A Hugging Face tokenizer.json.
void fuzz_tokenizer_json(const uint8_t* data, size_t size) {
  use_tokenizer(*load_tokenizer(put("tokjson", "tokenizer.json", data, size)));
}

// A recipe YAML file, then (after the first NUL) one key=value override per line, as trainer
// builds a recipe: defaults, the file, the overrides, then the checks.
void fuzz_recipe(const uint8_t* data, size_t size) {
  const auto [yaml, overrides] = split_at_nul(data, size);
  const std::string path = put("recipe", "recipe.yaml", yaml);
  Json recipe = recipe_defaults();
  merge_recipe(recipe, load_yaml_file(path), path);
  size_t begin = 0;
  while (begin < overrides.size()) {
    size_t end = overrides.find('\n', begin);
    if (end == std::string::npos) end = overrides.size();
    apply_override(recipe, overrides.substr(begin, end - begin));
    begin = end + 1;
  }
  (void)Recipe::from_json(recipe).to_json();
}

// Training data. The first byte picks the file name (text, JSON, JSONL, markdown), the format
// and the options; the rest is the file. A byte tokenizer stands in for a real one (the data
// code only sees ids).
void fuzz_data(const uint8_t* data, size_t size) {
  if (size == 0) return;
  const uint8_t mode = data[0];
  static const char* const kNames[] = {"data.txt", "data.json", "data.jsonl", "data.md"};
  static const char* const kFormats[] = {"auto",     "auto",     "text", "alpaca",
                                         "messages", "sharegpt", "auto", "auto"};
  DataConfig c;
  c.path = put("data", kNames[mode & 3], data + 1, size - 1);
  c.format = kFormats[(mode >> 2) & 7];
  c.pack = (mode >> 5) & 1;
  c.val_fraction = (mode >> 6) & 1 ? 0.25 : 0.0;
  c.overlong = (mode >> 7) & 1 ? "drop" : "truncate";
  c.seq_len = 128;
  c.chat_template = "chatml";
  const test::CharTokenizer tok;
  DataSplits s = load_data(c, tok);
  for (const auto* d : {s.train.get(), s.val.get()}) {
    if (!d) continue;
    std::vector<int64_t> tokens(d->seq_len()), targets(d->seq_len());
    for (int64_t i = 0; i < d->size(); ++i) {
      (void)d->fill(i, tokens.data(), targets.data());
      if (d->packed()) d->fill_segments(i, tokens.data(), targets.data());
    }
  }
}

// A PEFT adapter directory: adapter_config.json, then (after the first NUL) the
// adapter_model.safetensors whose __metadata__.qtune carries qtune's own record.
void fuzz_adapter_config(const uint8_t* data, size_t size) {
  const auto [config, weights] = split_at_nul(data, size);
  put("adapter", "adapter_config.json", config);
  const std::string dir = (fs::path(scratch_dir()) / "adapter").string();
  std::error_code ec;
  fs::remove(fs::path(dir) / "adapter_model.safetensors", ec);
  if (!weights.empty()) put("adapter", "adapter_model.safetensors", weights);
  (void)read_peft_config(dir);
  if (!weights.empty()) (void)read_peft_qtune_info(dir);
}

// The JSON meta of a quantized projection in a qtune pre-quantized directory (config.json
// quant_method "qtune"; the meta in model.safetensors' __metadata__ under "qtune:<weight>"), read
// back as the loader does and checked as a backend's load() does (state_layout.h).
void fuzz_quantized_state(const uint8_t* data, size_t size) {
  static const std::string kWeight = "model.layers.0.self_attn.q_proj.weight";
  static const bool config = [] {
    Json c = tiny_config().to_hf_json();
    c["quantization_config"] = {{"quant_method", "qtune"},
                                {"backend", "nf4"},
                                {"options", {{"block_size", 64}}},
                                {"skip_output", true},
                                {"format_version", 1}};
    put("quant", "config.json", c.dump());
    return true;
  }();
  (void)config;
  // The writer keeps metadata as JSON strings, which must be UTF-8: other bytes cannot be stored.
  const std::string meta(reinterpret_cast<const char*>(data), size);
  try {
    (void)Json(meta).dump();
  } catch (const Json::type_error&) {
    return;
  }
  std::map<std::string, torch::Tensor> w = tiny_weights();
  w.erase(kWeight);
  w[kWeight] = torch::zeros({32}, torch::kUInt8);
  w[kWeight + ".absmax"] = torch::ones({1});
  const std::string dir = (fs::path(scratch_dir()) / "quant").string();
  write_safetensors(dir + "/model.safetensors", w, {{"format", "pt"}, {"qtune:" + kWeight, meta}});
  ModelFiles m = open_model(dir);
  touch_weights(*m.weights);
  const TensorState s = m.weights->quantized(kWeight);
  const StateHeader h = check_state_meta(s, "nf4", 1);
  (void)h.describe(h.options);
  (void)check_state_tensors(s, "nf4",
                            {{"weight", torch::kUInt8, {(h.out * h.in + 1) / 2}},
                             {"weight.absmax", torch::kFloat32, {1}}},
                            h.describe(h.options));
}

// A plugin library's stamp, read from the file before anything would load it.
void fuzz_plugin_stamp(const uint8_t* data, size_t size) {
  const std::optional<PluginStamp> s = read_plugin_stamp(put("plugin", "libx.so", data, size));
  if (s) (void)std::string(s->name).size();
}

}  // namespace

const std::string& scratch_dir() {
  // Never destroyed: remove_scratch() runs at exit, after function-local statics are gone.
  static const std::string* dir = new std::string([] {
    const char* env = std::getenv("QTUNE_FUZZ_TMP");
    fs::path base = env && *env                    ? fs::path(env)
                    : fs::is_directory("/dev/shm") ? fs::path("/dev/shm")
                                                   : fs::temp_directory_path();
    fs::path d = base / ("qtune-fuzz-" + std::to_string(::getpid()));
    fs::create_directories(d);
    return d.string();
  }());
  static const int registered = std::atexit(remove_scratch);
  (void)registered;
  return *dir;
}

const std::vector<Target>& targets() {
  static const std::vector<Target> all = {
      {"safetensors", fuzz_safetensors},
      {"safetensors_index", fuzz_safetensors_index},
      {"hf_config", fuzz_hf_config},
      {"llama2c", fuzz_llama2c},
      {"tokenizer_bin", fuzz_tokenizer_bin},
      {"tokenizer_model", fuzz_tokenizer_model},
      {"tokenizer_json", fuzz_tokenizer_json},
      {"recipe", fuzz_recipe},
      {"data", fuzz_data},
      {"adapter_config", fuzz_adapter_config},
      {"quantized_state", fuzz_quantized_state},
      {"plugin_stamp", fuzz_plugin_stamp},
  };
  return all;
}

Entry find_target(const std::string& name) {
  for (const Target& t : targets())
    if (name == t.name) return t.entry;
  throw std::invalid_argument("no fuzz target named " + name);
}

}  // namespace qtune::fuzz
