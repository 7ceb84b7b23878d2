// qtune_oracle_helper: the qtune side of the oracle tests (tests/oracle/*.py). It exposes, as
// files, what no user-facing program prints: a model's logits, a backend's quantized state, the
// tensors qtune's safetensors reader sees, a tokenizer's ids. The Python oracle then runs the real
// library (transformers, PEFT, bitsandbytes, hqq, safetensors, sentencepiece, ...) on the same
// inputs and compares.
//
// Usage: qtune_oracle_helper REQUEST.json   (one JSON object; "cmd" selects what to do)
//   {"cmd": "version"} -> the plugins found and their versions
//   {"cmd": "logits", "model": DIR|BIN, "adapter": DIR?, "quant": NAME?, "quant_options": {}?,
//    "tokens": [[id, ...], ...], "out": FILE}
//       -> FILE.safetensors with "logits" fp32 [B, T, V]
//   {"cmd": "quantize", "backend": NAME, "options": {} | [{}, ...], "in": FILE, "out": FILE}
//       -> for each tensor N of the input: N/<state key> (the backend's state tensors),
//          N/dequant (fp32); __metadata__[N] = the state's JSON meta. With a list of option
//          sets, run i's names are prefixed "i/".
//   {"cmd": "dequantize", "backend": NAME, "in": FILE, "out": FILE}
//       -> the input holds states as W/<state key> (meta JSON, if any, in __metadata__[W]);
//          each is loaded with the backend's load() and written as W/dequant (fp32)
//   {"cmd": "copy_safetensors", "in": FILE, "out": FILE, "listing": FILE}
//       -> out: every tensor and the metadata as qtune's reader saw them, written by qtune's
//          writer; listing: {"tensors": {name: {dtype, shape}}, "metadata": {...}}
//   {"cmd": "tokenize", "tokenizer": FILE, "texts": FILE (JSON array of strings), "bos": bool,
//    "eos": bool, "out": FILE}
//       -> {"vocab_size", "bos_id", "eos_id", "ids": [[...], ...], "decoded": [...]}
// Every request prints one JSON line on stdout with the versions involved.
#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "qtune/trained_model.h"
#include "qtune/error.h"
#include "qtune/files.h"
#include "qtune/options.h"
#include "qtune/registry.h"
#include "qtune/safetensors.h"
#include "qtune/tokenizer.h"

namespace {

using qtune::Json;

std::string plugin_version(const qtune::Registry& registry, const std::string& name) {
  for (const auto& p : registry.plugins())
    if (p.name == name) return p.version;
  return "";
}

Json logits(const Json& req, qtune::Registry& registry) {
  torch::NoGradGuard no_grad;
  qtune::TrainedModelOptions o;
  o.model_path = req.at("model").get<std::string>();
  o.adapter_dir = req.value("adapter", "");
  o.quant = req.value("quant", "");
  if (req.contains("quant_options")) o.quant_options = req.at("quant_options");
  qtune::TrainedModel tm = qtune::load_trained_model(o, registry);
  std::vector<std::vector<int64_t>> rows =
      req.at("tokens").get<std::vector<std::vector<int64_t>>>();
  QTUNE_CHECK(!rows.empty(), "tokens: empty");
  const int64_t t = static_cast<int64_t>(rows[0].size());
  torch::Tensor tokens = torch::empty({static_cast<int64_t>(rows.size()), t}, torch::kInt64);
  for (size_t b = 0; b < rows.size(); ++b) {
    QTUNE_CHECK(static_cast<int64_t>(rows[b].size()) == t, "tokens: rows of different lengths");
    for (int64_t i = 0; i < t; ++i) tokens[b][i] = rows[b][i];
  }
  torch::Tensor out = tm.model->forward(tokens).to(torch::kFloat32).contiguous();
  qtune::write_safetensors(req.at("out").get<std::string>(), {{"logits", out}});
  return {
      {"base", tm.base_path},
      {"train_type", tm.identity.is_object() ? tm.identity.value("train_type", "")
                                             : std::string(o.adapter_dir.empty() ? "" : "peft")}};
}

Json quantize(const Json& req, qtune::Registry& registry) {
  const std::string name = req.at("backend").get<std::string>();
  auto backend = registry.quant(name);
  // "options" is one option set, or an array of them (keys then get an "<index>/" prefix), so
  // one process (one LibTorch start-up) serves a whole sweep.
  const Json given = req.value("options", Json::object());
  const bool sweep = given.is_array();
  const Json sets = sweep ? given : Json::array({given});
  auto in = qtune::SafetensorsFile::open(req.at("in").get<std::string>());
  std::map<std::string, torch::Tensor> out;
  std::map<std::string, std::string> meta;
  Json resolved = Json::array();
  for (size_t i = 0; i < sets.size(); ++i) {
    const Json options = qtune::resolve_options(backend->option_schema(), sets[i], "options");
    resolved.push_back(options);
    const std::string prefix = sweep ? std::to_string(i) + "/" : "";
    for (const auto& n : in->names()) {
      auto w = backend->quantize(in->tensor(n).clone(), options);
      auto st = w->state();
      for (const auto& [k, v] : st.tensors) out[prefix + n + "/" + k] = v.contiguous();
      out[prefix + n + "/dequant"] = w->dequantize(torch::kFloat32, torch::kCPU);
      meta[prefix + n] = st.meta.dump();
    }
  }
  qtune::write_safetensors(req.at("out").get<std::string>(), out, meta);
  return {{"backend", name},
          {"plugin_version", plugin_version(registry, name)},
          {"options", sweep ? resolved : resolved[0]}};
}

Json dequantize(const Json& req, qtune::Registry& registry) {
  const std::string name = req.at("backend").get<std::string>();
  auto backend = registry.quant(name);
  auto in = qtune::SafetensorsFile::open(req.at("in").get<std::string>());
  std::map<std::string, qtune::TensorState> states;
  for (const auto& n : in->names()) {
    const size_t slash = n.find('/');
    QTUNE_CHECK(slash != std::string::npos, "dequantize: tensor \"", n,
                "\" is not named <weight>/<state key>");
    states[n.substr(0, slash)].tensors[n.substr(slash + 1)] = in->tensor(n).clone();
  }
  std::map<std::string, torch::Tensor> out;
  for (auto& [w, st] : states) {
    auto m = in->metadata().find(w);
    if (m != in->metadata().end()) st.meta = Json::parse(m->second);
    out[w + "/dequant"] = backend->load(st)->dequantize(torch::kFloat32, torch::kCPU);
  }
  qtune::write_safetensors(req.at("out").get<std::string>(), out);
  return {{"backend", name},
          {"plugin_version", plugin_version(registry, name)},
          {"weights", states.size()}};
}

Json copy_safetensors(const Json& req) {
  auto in = qtune::SafetensorsFile::open(req.at("in").get<std::string>());
  Json listing = {{"tensors", Json::object()}, {"metadata", Json::object()}};
  std::map<std::string, torch::Tensor> out;
  for (const auto& n : in->names()) {
    const auto& info = in->info(n);
    listing["tensors"][n] = {{"dtype", info.dtype}, {"shape", info.shape}};
    out[n] = in->tensor(n).clone();
  }
  for (const auto& [k, v] : in->metadata()) listing["metadata"][k] = v;
  qtune::write_safetensors(req.at("out").get<std::string>(), out, in->metadata());
  std::ofstream(req.at("listing").get<std::string>()) << listing.dump(1);
  return {{"tensors", out.size()}};
}

Json tokenize(const Json& req) {
  auto tok = qtune::load_tokenizer(req.at("tokenizer").get<std::string>());
  const Json texts = qtune::read_json_file(req.at("texts").get<std::string>());
  const bool bos = req.value("bos", true), eos = req.value("eos", false);
  Json ids = Json::array(), decoded = Json::array();
  for (const auto& t : texts) {
    auto v = tok->encode(t.get<std::string>(), bos, eos);
    ids.push_back(v);
    decoded.push_back(tok->decode(v));
  }
  Json out = {{"vocab_size", tok->vocab_size()},
              {"bos_id", tok->bos_id()},
              {"eos_id", tok->eos_id()},
              {"ids", ids},
              {"decoded", decoded}};
  std::ofstream(req.at("out").get<std::string>()) << out.dump();
  return {{"texts", texts.size()}};
}

int run(int argc, char** argv) {
  QTUNE_CHECK(argc == 2, "usage: qtune_oracle_helper REQUEST.json");
  const Json req = qtune::read_json_file(argv[1]);
  const std::string cmd = req.at("cmd").get<std::string>();
  auto& registry = qtune::Registry::global();
  registry.scan(qtune::Registry::default_dirs(req.value("plugin_dir", "")));
  Json result;
  if (cmd == "version") {
    result["plugins"] = Json::object();
    for (const auto& p : registry.plugins()) result["plugins"][p.name] = p.version;
  } else if (cmd == "logits") {
    result = logits(req, registry);
  } else if (cmd == "quantize") {
    result = quantize(req, registry);
  } else if (cmd == "dequantize") {
    result = dequantize(req, registry);
  } else if (cmd == "copy_safetensors") {
    result = copy_safetensors(req);
  } else if (cmd == "tokenize") {
    result = tokenize(req);
  } else {
    throw qtune::UserError(
        "unknown cmd \"" + cmd +
        "\" (expected version, logits, quantize, dequantize, copy_safetensors or tokenize)");
  }
  result["cmd"] = cmd;
  result["libtorch"] = TORCH_VERSION;
  std::printf("%s\n", result.dump().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const qtune::UserError& e) {
    std::fprintf(stderr, "qtune_oracle_helper: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qtune_oracle_helper: internal error: %s\n", e.what());
    return 1;
  }
}
