// qtune-quantize: write a pre-quantized HF-style directory that `trainer --train_type qlora`
// loads without requantizing: qtune's own layout (core/include/qtune/quantized_model.h), or with
// --format bnb the bitsandbytes 4-bit layout transformers and PEFT load (qtune/bnb_model.h).
#include <boost/program_options.hpp>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "app_main.h"
#include "qtune/bnb_model.h"
#include "qtune/error.h"
#include "qtune/model.h"
#include "qtune/output_dir.h"
#include "qtune/quantized_model.h"
#include "qtune/recipe.h"
#include "qtune/registry.h"

namespace po = boost::program_options;

namespace {

// "a,b, c" -> {"a", "b", "c"}; empty items are an error naming the flag.
std::vector<std::string> split_list(const std::string& text, const char* flag) {
  std::vector<std::string> out;
  if (text.empty()) return out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    const auto b = item.find_first_not_of(' '), e = item.find_last_not_of(' ');
    QTUNE_CHECK(b != std::string::npos, flag, " has an empty module pattern in '", text, "'");
    out.push_back(item.substr(b, e - b + 1));
  }
  return out;
}

int run(int argc, char** argv) {
  po::options_description opts("qtune-quantize options");
  // clang-format off
  opts.add_options()
    ("help,h", "show this help")
    ("model", po::value<std::string>(), "HF model directory or llama2.c .bin")
    ("tokenizer", po::value<std::string>()->default_value(""), "tokenizer to copy (default: the model's)")
    ("quant", po::value<std::string>()->default_value("nf4"), "quantization plugin")
    ("quant_options", po::value<std::string>()->default_value("{}"), "plugin options as JSON")
    ("format", po::value<std::string>()->default_value("qtune"),
     "qtune (any backend; trainer reads it) | bnb (bitsandbytes 4-bit as transformers saves it; "
     "a backend with bitsandbytes' layout, i.e. nf4; the output head stays dense)")
    ("skip_output", po::bool_switch(), "keep the output head dense (always so with --format bnb)")
    ("skip_modules", po::value<std::string>()->default_value(""),
     "comma-separated module patterns kept dense, e.g. down_proj,layers.0 or 'model.layers.*.mlp.*'")
    ("dtype", po::value<std::string>()->default_value("bf16"), "dtype of the dense tensors: fp32 | bf16")
    ("out", po::value<std::string>(), "output directory (new or empty)")
    ("overwrite", po::bool_switch(), "replace the contents of a non-empty --out")
    ("plugin_dir", po::value<std::string>()->default_value(""), "search this plugin folder first");
  // clang-format on
  po::variables_map vm = qtune::app::parse_flags(argc, argv, opts, "qtune-quantize");
  if (vm.count("help")) {
    std::cout << "usage: qtune-quantize --model PATH --quant NAME --out DIR [options]\n\n" << opts;
    return 0;
  }
  QTUNE_CHECK(vm.count("model"), "--model is required");
  QTUNE_CHECK(vm.count("out"), "--out is required");
  const std::string format = vm["format"].as<std::string>();
  QTUNE_CHECK(format == "qtune" || format == "bnb", "--format must be qtune or bnb, got '", format,
              "'");
  const auto skip = split_list(vm["skip_modules"].as<std::string>(), "--skip_modules");
  auto& registry = qtune::Registry::global();
  registry.scan(qtune::Registry::default_dirs(vm["plugin_dir"].as<std::string>()));
  auto backend = registry.quant(vm["quant"].as<std::string>());
  const auto options =
      backend->check_options(qtune::app::json_flag(vm, "quant_options"), "quant.options");
  const auto dtype = qtune::parse_dtype(vm["dtype"].as<std::string>(), "--dtype");

  const std::string model_path =
      qtune::resolve_data_path(vm["model"].as<std::string>(), "--model");
  qtune::ModelFiles files = qtune::open_model(model_path);
  std::string tok = vm["tokenizer"].as<std::string>();
  tok = tok.empty() ? files.tokenizer_path : qtune::resolve_data_path(tok, "--tokenizer");
  const std::string out = vm["out"].as<std::string>();
  qtune::prepare_output_directory(out, "--out", vm["overwrite"].as<bool>(),
                                  {model_path, tok});
  const int64_t bytes = format == "bnb" ? qtune::save_bnb_model(out, files.config, *files.weights,
                                                                *backend, options, skip, dtype, tok)
                                        : qtune::save_quantized_model(
                                              out, files.config, *files.weights, *backend, options,
                                              vm["skip_output"].as<bool>(), dtype, tok, skip);
  std::printf("wrote %s (%s format): %s %s, quantized projections %.3f MB\n", out.c_str(),
              format.c_str(), backend->name().c_str(), options.dump().c_str(), bytes / 1e6);
  return 0;
}

}  // namespace

QTUNE_APP_MAIN("qtune-quantize", run)
