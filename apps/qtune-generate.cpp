// qtune-generate: continue a prompt with a model, optionally with a trained adapter or checkpoint
// on it, to look at what a fine-tune learned. Greedy (temperature 0), temperature and top-p
// sampling with a KV cache; tokens stream to stdout as they are produced, like llama2.c's run.
// With --chat the prompt is a user message rendered with the chat template the adapter was
// trained with (or --template), and the answer ends at the end-of-turn token.
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "app_main.h"
#include "qtune/chat_template.h"
#include "qtune/checkpoint.h"
#include "qtune/trained_model.h"
#include "qtune/error.h"
#include "qtune/files.h"
#include "qtune/generate.h"
#include "qtune/recipe.h"
#include "qtune/registry.h"
#include "qtune/tokenizer.h"

namespace fs = std::filesystem;
namespace po = boost::program_options;

namespace {

// data.template of the run that trained `adapter_dir` ("" when unknown or "auto"): a checkpoint
// holds its recipe; an adapter written by trainer sits in the run's output_dir beside recipe.json.
std::string trained_template(const std::string& adapter_dir) {
  qtune::Json recipe;
  try {
    recipe = qtune::read_checkpoint_state(adapter_dir).recipe;
  } catch (const qtune::UserError&) {
    const fs::path beside = fs::path(adapter_dir).lexically_normal().parent_path() / "recipe.json";
    if (fs::is_regular_file(beside)) recipe = qtune::read_json_file(beside.string());
  }
  if (!recipe.is_object() || !recipe.contains("data")) return "";
  const std::string t = recipe["data"].value("template", "auto");
  return t == "auto" ? "" : t;
}

// --template, else the trained run's data.template, else the tokenizer's own chat_template.
qtune::ChatTemplate chat_template(const po::variables_map& vm, const std::string& adapter_dir,
                                  const qtune::Tokenizer& tok) {
  const std::string given = vm["template"].as<std::string>();
  if (given != "auto") return qtune::ChatTemplate::builtin(given, "--template");
  const std::string trained = adapter_dir.empty() ? "" : trained_template(adapter_dir);
  if (!trained.empty()) return qtune::ChatTemplate::builtin(trained, adapter_dir + " data.template");
  if (!tok.config().chat_template.empty())
    return qtune::ChatTemplate::from_jinja(tok.config().chat_template, tok.config().path);
  std::string names;
  for (const auto& n : qtune::ChatTemplate::builtin_names()) names += (names.empty() ? "" : ", ") + n;
  throw qtune::UserError("--chat: no chat template is known for this model (no run recipe with "
                         "data.template beside the adapter, no chat_template in the tokenizer's "
                         "tokenizer_config.json); give --template (one of: " + names + ")");
}

int run(int argc, char** argv) {
  po::options_description opts("qtune-generate options");
  // clang-format off
  opts.add_options()
    ("help,h", "show this help")
    ("model", po::value<std::string>(), "base model: HF directory or llama2.c .bin (default: the adapter's)")
    ("tokenizer", po::value<std::string>(), "tokenizer .model or tok*.bin (default: the run's or the model's)")
    ("adapter", po::value<std::string>(), "PEFT adapter directory or training checkpoint")
    ("prompt", po::value<std::string>()->default_value(""), "text to continue (empty: start from BOS); with --chat the user's message")
    ("chat", "chat: render --prompt (and --system) with the chat template, print the answer")
    ("system", po::value<std::string>()->default_value(""), "--chat: a system message before the prompt")
    ("template", po::value<std::string>()->default_value("auto"), "--chat: built-in chat template (auto: the adapter's training recipe, else the tokenizer's)")
    ("max_new_tokens", po::value<int64_t>()->default_value(256), "tokens to generate at most")
    ("temperature", po::value<double>()->default_value(0.0), "0 = greedy")
    ("top_p", po::value<double>()->default_value(1.0), "nucleus sampling mass in (0, 1]")
    ("seed", po::value<uint64_t>()->default_value(0), "sampling seed")
    ("dtype", po::value<std::string>()->default_value("fp32"), "compute dtype: fp32 | bf16")
    ("base_quant", po::value<std::string>(), "adapters from other tools only: quantize the base with this backend")
    ("base_quant_options", po::value<std::string>()->default_value("{}"), "options of --base_quant as JSON")
    ("threads", po::value<int64_t>()->default_value(0), "intra-op threads (0 = LibTorch's default)")
    ("plugin_dir", po::value<std::string>()->default_value(""), "search this plugin folder first");
  // clang-format on
  po::variables_map vm = qtune::app::parse_flags(argc, argv, opts, "qtune-generate");
  if (vm.count("help")) {
    std::cout << "usage: qtune-generate --model M [--adapter DIR] --prompt TEXT [--chat] [options]\n\n"
              << opts;
    return 0;
  }
  QTUNE_CHECK(vm.count("model") || vm.count("adapter"), "give --model (and optionally --adapter)");
  if (vm["threads"].as<int64_t>() > 0)
    at::set_num_threads(static_cast<int>(vm["threads"].as<int64_t>()));

  auto& registry = qtune::Registry::global();
  const std::string plugin_dir = vm["plugin_dir"].as<std::string>();
  QTUNE_CHECK(plugin_dir.empty() || fs::is_directory(plugin_dir),
              "--plugin_dir: not a directory: ", plugin_dir);
  registry.scan(qtune::Registry::default_dirs(plugin_dir));

  qtune::TrainedModelOptions o;
  if (vm.count("model"))
    o.model_path = qtune::resolve_data_path(vm["model"].as<std::string>(), "--model");
  if (vm.count("adapter")) o.adapter_dir = vm["adapter"].as<std::string>();
  if (vm.count("base_quant")) o.quant = vm["base_quant"].as<std::string>();
  o.quant_options = qtune::app::json_flag(vm, "base_quant_options");
  o.dtype = qtune::parse_dtype(vm["dtype"].as<std::string>(), "--dtype");
  qtune::TrainedModel tm = qtune::load_trained_model(o, registry);

  const std::string tok_path =
      vm.count("tokenizer")
          ? qtune::resolve_data_path(vm["tokenizer"].as<std::string>(), "--tokenizer")
          : tm.tokenizer_path;
  QTUNE_CHECK(!tok_path.empty(), tm.base_path, " has no tokenizer beside it; give --tokenizer");
  auto tok = qtune::load_tokenizer(tok_path);
  QTUNE_CHECK(tok->vocab_size() <= tm.config.vocab_size, "--tokenizer: ", tok_path, " has ",
              tok->vocab_size(), " tokens but the model's vocabulary is ", tm.config.vocab_size);

  qtune::GenerateOptions g;
  g.max_new_tokens = vm["max_new_tokens"].as<int64_t>();
  g.temperature = vm["temperature"].as<double>();
  g.top_p = vm["top_p"].as<double>();
  g.seed = vm["seed"].as<uint64_t>();
  QTUNE_CHECK(g.max_new_tokens > 0, "--max_new_tokens must be > 0, got ", g.max_new_tokens);
  // llama2.c's models end a story with BOS; HF chat/instruct models with EOS.
  g.stop_tokens = {tok->bos_id(), tok->eos_id()};

  const std::string prompt = vm["prompt"].as<std::string>();
  const bool chat = vm.count("chat") > 0;
  QTUNE_CHECK(chat || (vm["system"].defaulted() && vm["template"].defaulted()),
              "--system and --template go with --chat");
  std::vector<int64_t> ids;
  std::string template_name;
  if (chat) {
    const qtune::ChatTemplate tmpl = chat_template(vm, o.adapter_dir, *tok);
    template_name = tmpl.name();
    qtune::Conversation conv;
    if (!vm["system"].as<std::string>().empty())
      conv.push_back({"system", vm["system"].as<std::string>()});
    conv.push_back({"user", prompt});
    for (int id : tmpl.encode(conv, /*add_generation_prompt=*/true, *tok).ids) ids.push_back(id);
    // The answer ends where training put the end of the turn (EOS, or the template's own token).
    g.stop_tokens = {};
    for (int id : tmpl.stop_ids(*tok)) g.stop_tokens.push_back(id);
  } else {
    for (int id : tok->encode(prompt, /*bos=*/true, /*eos=*/false)) ids.push_back(id);
  }
  const int64_t room = tm.config.max_position_embeddings - static_cast<int64_t>(ids.size());
  QTUNE_CHECK(room > 0, "--prompt has ", ids.size(), " tokens; the model's context is ",
              tm.config.max_position_embeddings);
  g.max_new_tokens = std::min(g.max_new_tokens, room);

  // The prompt is printed token by token as run.c does, so what is shown is what the model saw;
  // in a chat only the answer is printed.
  int prev = tok->bos_id();
  for (size_t i = 1; i < ids.size(); ++i) {
    if (!chat) std::fputs(tok->decode_token(prev, static_cast<int>(ids[i])).c_str(), stdout);
    prev = static_cast<int>(ids[i]);
  }
  std::fflush(stdout);
  const auto t0 = std::chrono::steady_clock::now();
  auto out = qtune::generate(*tm.model, ids, g, [&](int64_t id) {
    std::fputs(tok->decode_token(prev, static_cast<int>(id)).c_str(), stdout);
    std::fflush(stdout);
    prev = static_cast<int>(id);
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("\n");
  // generate() stops before a stop token; fewer tokens than allowed means one came.
  const bool stopped = static_cast<int64_t>(out.size()) < g.max_new_tokens;
  std::fprintf(stderr, "qtune-generate: %zu tokens in %.2fs (%.1f tok/s)%s%s%s%s%s\n", out.size(),
               s, out.size() / std::max(1e-9, s), o.adapter_dir.empty() ? "" : ", adapter ",
               o.adapter_dir.c_str(), chat ? ", chat template " : "", template_name.c_str(),
               chat ? (stopped ? ", answer ended at its end of turn" : ", answer cut at --max_new_tokens")
                    : "");
  return 0;
}

}  // namespace

QTUNE_APP_MAIN("qtune-generate", run)
