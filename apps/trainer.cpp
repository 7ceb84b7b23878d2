// trainer: fine-tune a Llama-family model (full, LoRA or QLoRA) from a YAML recipe, flags and
// key.path=value overrides. With no arguments it runs configs/default.yaml.
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include <boost/dll/runtime_symbol_info.hpp>
#include <boost/program_options.hpp>
#include <spdlog/spdlog.h>

#include "app_main.h"
#include "qtune/error.h"
#include "qtune/launcher.h"
#include "qtune/process_group.h"
#include "qtune/recipe.h"
#include "qtune/registry.h"
#include "qtune/train.h"

namespace fs = std::filesystem;
namespace po = boost::program_options;

namespace {

// configs/default.yaml from the working directory, else from the source tree this was built in.
std::string default_config() {
  std::vector<fs::path> candidates{"configs/default.yaml"};
  std::error_code ec;
  auto exe = boost::dll::program_location(ec);
  if (!ec) candidates.push_back(exe.parent_path() / "../../configs/default.yaml");
#ifdef QTUNE_SOURCE_DIR
  candidates.push_back(fs::path(QTUNE_SOURCE_DIR) / "configs/default.yaml");
#endif
  for (const auto& c : candidates)
    if (fs::exists(c)) return c.lexically_normal().string();
  return "";
}

// The first SIGINT/SIGTERM asks the trainer to finish the step, save a checkpoint and exit 0; a
// second one (the default action) ends the process at once: checkpoints are written so that
// this never destroys the previous one.
void on_signal(int sig) {
  qtune::Trainer::request_stop();
  std::signal(sig, SIG_DFL);
}

int run(int argc, char** argv) {
  po::options_description opts("trainer options");
  // clang-format off
  opts.add_options()
    ("help,h", "show this help")
    ("config", po::value<std::string>(), "YAML recipe (default: configs/default.yaml)")
    ("train_type", po::value<std::string>(), "full | lora | qlora")
    ("quant", po::value<std::string>(), "quantization plugin for qlora (nf4, hqq, int8, ...)")
    ("adapter", po::value<std::string>(), "adapter plugin (lora)")
    ("model", po::value<std::string>(), "HF model directory or llama2.c .bin")
    ("tokenizer", po::value<std::string>(), "tokenizer .model or tok*.bin")
    ("data", po::value<std::string>(), "training data file")
    ("data_format", po::value<std::string>(), "auto | text | alpaca")
    ("val_data", po::value<std::string>(), "validation data file (else data.val_fraction)")
    ("max_steps", po::value<int64_t>(), "optimizer steps")
    ("eval_every", po::value<int64_t>(), "evaluate every N steps (0 = only at the end)")
    ("batch_size", po::value<int64_t>(), "sequences per micro-batch")
    ("seq_len", po::value<int64_t>(), "tokens per sequence")
    ("lr", po::value<double>(), "peak learning rate")
    ("dtype", po::value<std::string>(), "compute dtype: fp32 | bf16")
    ("seed", po::value<int64_t>(), "random seed")
    ("threads", po::value<int64_t>(), "intra-op threads (0 = all cores)")
    ("output_dir", po::value<std::string>(), "where metrics, summary, checkpoints and weights go")
    ("resume", po::value<std::string>(), "continue from a checkpoint: latest | DIR")
    ("plugin_dir", po::value<std::string>(), "search this plugin folder first")
    ("nproc_per_node", po::value<int64_t>(),
     "start N local data-parallel ranks of this command (like torchrun --standalone)")
    ("list-plugins", "list the plugins found and exit")
    ("print-config", "print the complete recipe and exit")
    ("verbose,v", "debug logging")
    ("overrides", po::value<std::vector<std::string>>(), "key.path=value ...");
  // clang-format on
  po::positional_options_description pos;
  pos.add("overrides", -1);
  po::variables_map vm = qtune::app::parse_flags(argc, argv, opts, "trainer", &pos);
  if (vm.count("help")) {
    std::cout << "usage: trainer [--config FILE] [flags] [key.path=value ...]\n\n"
              << opts << "\nSee docs/cli.md for every recipe key.\n";
    return 0;
  }
  if (vm.count("verbose")) spdlog::set_level(spdlog::level::debug);

  qtune::Json recipe = qtune::recipe_defaults();
  std::string config = vm.count("config") ? vm["config"].as<std::string>() : default_config();
  if (!config.empty()) qtune::merge_recipe(recipe, qtune::load_yaml_file(config), config);

  // Flags are recipe keys under another name.
  auto set = [&](const char* flag, const std::string& key) {
    if (!vm.count(flag)) return;
    const auto& v = vm[flag].value();
    std::string text;
    if (auto* s = boost::any_cast<std::string>(&v)) text = "\"" + *s + "\"";
    else if (auto* i = boost::any_cast<int64_t>(&v)) text = std::to_string(*i);
    else if (auto* d = boost::any_cast<double>(&v)) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.17g", *d);
      text = buf;
    }
    qtune::apply_override(recipe, key + "=" + text);
  };
  set("train_type", "train_type");
  set("quant", "quant.name");
  set("adapter", "adapter.name");
  set("model", "model.path");
  set("tokenizer", "model.tokenizer");
  set("data", "data.path");
  set("data_format", "data.format");
  set("val_data", "data.val_path");
  set("max_steps", "train.max_steps");
  set("eval_every", "eval.every");
  set("batch_size", "train.batch_size");
  set("seq_len", "data.seq_len");
  set("lr", "train.lr");
  set("dtype", "dtype");
  set("seed", "seed");
  set("threads", "threads");
  set("output_dir", "output_dir");
  set("plugin_dir", "plugin_dir");
  set("resume", "resume");
  if (vm.count("overrides"))
    for (const auto& o : vm["overrides"].as<std::vector<std::string>>())
      qtune::apply_override(recipe, o);

  auto& registry = qtune::Registry::global();
  const std::string plugin_dir = recipe["plugin_dir"].get<std::string>();
  QTUNE_CHECK(plugin_dir.empty() || fs::is_directory(plugin_dir),
              "plugin_dir: not a directory: ", plugin_dir);
  registry.scan(qtune::Registry::default_dirs(plugin_dir));

  if (vm.count("list-plugins")) {
    std::printf("%-8s %-10s %-10s %s\n", "kind", "name", "version", "path");
    for (const auto& p : registry.plugins())
      std::printf("%-8s %-10s %-10s %s\n", p.kind.c_str(), p.name.c_str(), p.version.c_str(),
                  p.path.c_str());
    for (const auto& e : registry.errors()) std::printf("failed   %s\n", e.c_str());
    return 0;
  }

  qtune::ResolvedRecipe resolved = qtune::resolve_recipe(recipe, registry);
  if (vm.count("print-config")) {
    std::cout << resolved.recipe.dump(2) << "\n";
    return 0;
  }

  if (vm.count("nproc_per_node")) {
    // The same command without the flag, once per rank; the recipe was checked once above.
    std::vector<std::string> args{boost::dll::program_location().string()};
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--nproc_per_node") {
        ++i;
        continue;
      }
      if (a.rfind("--nproc_per_node=", 0) == 0) continue;
      args.push_back(a);
    }
    qtune::LaunchOptions launch;
    launch.nproc = vm["nproc_per_node"].as<int64_t>();
    launch.grace_s = qtune::dist_config_from_recipe(resolved.recipe).timeout_s + 10;
    return qtune::launch_local_ranks(args, launch);
  }

  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  if (!config.empty()) spdlog::info("recipe: {}", config);
  qtune::Trainer trainer(std::move(resolved));
  qtune::Json s = trainer.run();
  if (s["dist"]["rank"].get<int64_t>() != 0) return 0;  // rank 0 reports for the job
  std::printf("\n== summary (%s/summary.json)\n", recipe["output_dir"].get<std::string>().c_str());
  std::printf("train_type %s  quant %s  adapter %s\n", s["train_type"].get<std::string>().c_str(),
              s["quant"].is_null() ? "-" : s["quant"].get<std::string>().c_str(),
              s["adapter"].is_null() ? "-" : s["adapter"].get<std::string>().c_str());
  std::printf("trainable %lld / %lld parameters, linear weights %.3f MB, base %.3f MB\n",
              static_cast<long long>(s["trainable_parameters"].get<int64_t>()),
              static_cast<long long>(s["total_parameters"].get<int64_t>()),
              s["linear_weight_bytes"].get<double>() / 1e6, s["base_weight_bytes"].get<double>() / 1e6);
  std::printf("%lld steps, %.0f tokens/s, peak RSS %.1f MB\n",
              static_cast<long long>(s["steps"].get<int64_t>()), s["tokens_per_s"].get<double>(),
              s["peak_rss_bytes"].get<double>() / 1e6);
  if (!s["first_val_loss"].is_null()) {
    const double a = s["first_val_loss"], b = s["final_val_loss"], best = s["best_val_loss"];
    std::printf("val loss %.4f -> %.4f (best %.4f): %s\n", a, b, best,
                b < a ? "went down" : "did NOT go down");
  }
  std::printf("saved %s\n", s["saved"].get<std::string>().c_str());
  if (s["stopped_early"].get<bool>() && s["checkpoint"].is_string())
    std::printf("stopped at step %lld; checkpoint saved to %s; resume with --resume latest\n",
                static_cast<long long>(s["steps"].get<int64_t>()),
                s["checkpoint"].get<std::string>().c_str());
  return 0;
}

}  // namespace

QTUNE_APP_MAIN("trainer", run)
