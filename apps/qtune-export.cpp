// qtune-export: turn what training wrote (a PEFT adapter directory or a checkpoint) into files
// other tools load: a clean PEFT adapter directory, an HF model directory with the adapters
// merged onto the dequantized base (fp32 or bf16), or that merged model requantized with any
// backend (a qtune-quantize style directory).
#include <boost/program_options.hpp>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "app_main.h"
#include "qtune/trained_model.h"
#include "qtune/error.h"
#include "qtune/output_dir.h"
#include "qtune/files.h"
#include "qtune/model.h"
#include "qtune/model_files.h"
#include "qtune/peft.h"
#include "qtune/quantized_model.h"
#include "qtune/recipe.h"
#include "qtune/registry.h"

namespace fs = std::filesystem;
namespace po = boost::program_options;

namespace {

int run(int argc, char** argv) {
  po::options_description opts("qtune-export options");
  // clang-format off
  opts.add_options()
    ("help,h", "show this help")
    ("adapter", po::value<std::string>(), "PEFT adapter directory or training checkpoint (checkpoints/step-N)")
    ("model", po::value<std::string>(), "base model (default: the one the adapter records)")
    ("tokenizer", po::value<std::string>(), "tokenizer to copy into the output (default: the run's)")
    ("out", po::value<std::string>(), "output directory (new or empty)")
    ("overwrite", po::bool_switch(), "replace the contents of a non-empty --out")
    ("merge", po::bool_switch(), "write an HF model with the adapters merged onto the dequantized base")
    ("dtype", po::value<std::string>()->default_value("fp32"), "merged weights: fp32 | bf16")
    ("requantize", po::value<std::string>(), "quantize the merged model with this backend (implies --merge)")
    ("quant_options", po::value<std::string>(), "options of --requantize as JSON")
    ("skip_output", po::bool_switch(), "with --requantize: keep the output head dense")
    ("base_quant", po::value<std::string>(), "adapters from other tools only: quantize the base with this backend")
    ("base_quant_options", po::value<std::string>(), "options of --base_quant as JSON")
    ("plugin_dir", po::value<std::string>()->default_value(""), "search this plugin folder first");
  // clang-format on
  po::variables_map vm = qtune::app::parse_flags(argc, argv, opts, "qtune-export");
  if (vm.count("help")) {
    std::cout << "usage: qtune-export --adapter DIR --out DIR [--merge [--dtype fp32|bf16]]\n"
                 "                    [--requantize NAME [--quant_options JSON]] [--model M]\n\n"
              << opts
              << "\nWithout --merge an adapter (or an adapter run's checkpoint) is written as a "
                 "PEFT directory.\nSee docs/checkpoints.md.\n";
    return 0;
  }
  QTUNE_CHECK(vm.count("adapter"), "--adapter is required (a PEFT directory or a checkpoint)");
  QTUNE_CHECK(vm.count("out"), "--out is required");
  QTUNE_CHECK(!vm.count("quant_options") || vm.count("requantize"),
              "--quant_options goes with --requantize");
  const std::string out = vm["out"].as<std::string>();
  const bool requantize = vm.count("requantize") > 0;
  bool merge = vm["merge"].as<bool>() || requantize;
  const auto dtype = qtune::parse_dtype(vm["dtype"].as<std::string>(), "--dtype");

  auto& registry = qtune::Registry::global();
  const std::string plugin_dir = vm["plugin_dir"].as<std::string>();
  QTUNE_CHECK(plugin_dir.empty() || fs::is_directory(plugin_dir),
              "--plugin_dir: not a directory: ", plugin_dir);
  registry.scan(qtune::Registry::default_dirs(plugin_dir));

  qtune::TrainedModelOptions o;
  o.adapter_dir = vm["adapter"].as<std::string>();
  if (vm.count("model"))
    o.model_path = qtune::resolve_data_path(vm["model"].as<std::string>(), "--model");
  if (vm.count("base_quant")) o.quant = vm["base_quant"].as<std::string>();
  o.quant_options = qtune::app::json_flag(vm, "base_quant_options");
  qtune::TrainedModel tm = qtune::load_trained_model(o, registry);
  std::string tok = vm.count("tokenizer")
                        ? qtune::resolve_data_path(vm["tokenizer"].as<std::string>(), "--tokenizer")
                        : tm.tokenizer_path;
  QTUNE_CHECK(tok.empty() || fs::exists(tok), "--tokenizer: file not found: ", tok);
  qtune::prepare_output_directory(out, "--out", vm["overwrite"].as<bool>(),
                                  {o.adapter_dir, tm.base_path, tok});

  const qtune::TuningSpec& spec = tm.model->spec();
  // A full fine-tune's checkpoint, or a base without adapter, is a whole model.
  if (!spec.adapter.present()) merge = true;
  const qtune::Json& id = tm.identity;
  const std::string what = spec.adapter.present() ? "base + adapter" : "full fine-tune";

  if (!merge) {
    qtune::save_peft_adapter(
        out, *tm.model, tm.base_path,
        id.is_object() ? qtune::Json{{"identity", id}, {"tokenizer", tok}} : qtune::Json());
    std::printf("wrote %s: PEFT adapter (%s) for %s, %.3f MB\n", out.c_str(),
                spec.adapter.factory->name().c_str(), tm.base_path.c_str(),
                qtune::directory_bytes(out) / 1e6);
    return 0;
  }

  if (id.is_object() && id.value("train_type", "") == "qlora" && tm.config.tie_word_embeddings &&
      !id.value("quant_skip_output", false))
    std::fprintf(stderr,
                 "qtune-export: note: the output head was a quantized copy of the tied embedding "
                 "during training; the merged model keeps the tie, so its head is the "
                 "full-precision embedding\n");
  auto weights = qtune::model_weights(*tm.model, /*merge_adapters=*/true);
  if (requantize) {
    auto backend = registry.quant(vm["requantize"].as<std::string>());
    const auto options =
        backend->check_options(qtune::app::json_flag(vm, "quant_options"), "--quant_options");
    const int64_t bytes = qtune::save_quantized_model(out, tm.config, *weights, *backend, options,
                                                      vm["skip_output"].as<bool>(), dtype, tok);
    std::printf("wrote %s: merged %s requantized with %s %s (projections %.3f MB, dense %s)\n",
                out.c_str(), what.c_str(), backend->name().c_str(), options.dump().c_str(),
                bytes / 1e6, vm["dtype"].as<std::string>().c_str());
    return 0;
  }
  qtune::save_hf_model(out, tm.config, *weights, dtype, tok);
  std::printf("wrote %s: merged %s as an HF model in %s, %.3f MB\n", out.c_str(), what.c_str(),
              qtune::hf_torch_dtype_name(dtype).c_str(), qtune::directory_bytes(out) / 1e6);
  return 0;
}

}  // namespace

QTUNE_APP_MAIN("qtune-export", run)
