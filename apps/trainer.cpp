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
    ("config", po::value<std::string>(), "YAML recipe (default: configs/default.yaml)");
  // clang-format on
  // Every recipe key that has a flag (recipe.cpp declares them), typed as the key is.
  auto semantic = [](const std::string& type) -> po::value_semantic* {
    if (type == "integer") return po::value<int64_t>();
    if (type == "number") return po::value<double>();
    if (type == "boolean") return po::bool_switch();
    return po::value<std::string>();
  };
  for (const auto& k : qtune::recipe_keys())
    if (!k.flag.empty())
      opts.add_options()(k.flag.c_str(), semantic(k.type()), (k.doc + " (" + k.path + ")").c_str());
  // clang-format off
  opts.add_options()
    ("nproc_per_node", po::value<int64_t>(),
     "start N local data-parallel ranks of this command (like torchrun --standalone)")
    ("list-plugins", "list the plugins found and exit")
    ("print-config", "print the complete recipe and exit")
    ("recipe-keys", "print every recipe key as a markdown table (docs/cli.md) and exit")
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
  if (vm.count("recipe-keys")) {
    std::cout << qtune::recipe_keys_markdown();
    return 0;
  }

  qtune::Json recipe = qtune::recipe_defaults();
  std::string config = vm.count("config") ? vm["config"].as<std::string>() : default_config();
  if (!config.empty()) qtune::merge_recipe(recipe, qtune::load_yaml_file(config), config);

  // Flags are recipe keys under another name.
  for (const auto& k : qtune::recipe_keys()) {
    if (k.flag.empty() || !vm.count(k.flag)) continue;
    const auto& v = vm[k.flag].value();
    std::string text;
    if (auto* b = boost::any_cast<bool>(&v)) {
      if (vm[k.flag].defaulted()) continue;  // a switch not given
      text = *b ? "true" : "false";
    } else if (auto* str = boost::any_cast<std::string>(&v)) {
      text = qtune::Json(*str).dump();  // quoted: a string key stays a string
    } else if (auto* i = boost::any_cast<int64_t>(&v)) {
      text = std::to_string(*i);
    } else if (auto* d = boost::any_cast<double>(&v)) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.17g", *d);
      text = buf;
    }
    qtune::apply_override(recipe, k.path + "=" + text);
  }
  if (vm.count("overrides"))
    for (const auto& o : vm["overrides"].as<std::vector<std::string>>())
      qtune::apply_override(recipe, o);

  auto& registry = qtune::Registry::global();
  const std::string plugin_dir = recipe["plugin_dir"].get<std::string>();
  QTUNE_CHECK(plugin_dir.empty() || fs::is_directory(plugin_dir),
              "plugin_dir: not a directory: ", plugin_dir);
  registry.scan(qtune::Registry::default_dirs(plugin_dir));

  if (vm.count("list-plugins")) {
    std::fputs(qtune::plugin_listing(registry).c_str(), stdout);
    return 0;
  }

  qtune::ResolvedRecipe resolved = qtune::resolve_recipe(recipe, registry);
  if (vm.count("print-config")) {
    std::cout << resolved.tree.dump(2) << "\n";
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
    launch.grace_s = resolved.recipe.dist.timeout_s + 10;
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
