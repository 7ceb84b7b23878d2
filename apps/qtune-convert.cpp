// qtune-convert: turn a llama2.c .bin checkpoint (or an HF directory) into a Hugging Face Llama
// directory (config.json + model.safetensors [+ tokenizer.json, tokenizer_config.json and the
// original tokenizer.model / tokenizer.bin]) in fp32 or bf16. The conversion itself is core's
// open_model() + save_hf_model(); this file only parses flags and reports.
#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>

#include "app_main.h"
#include "qtune/error.h"
#include "qtune/model_files.h"
#include "qtune/output_dir.h"
#include "qtune/tokenizer.h"
#include "qtune/recipe.h"
#include "qtune/weight_source.h"

namespace po = boost::program_options;

namespace {

int run(int argc, char** argv) {
  po::options_description opts("qtune-convert options");
  // clang-format off
  opts.add_options()
    ("help,h", "show this help")
    ("model", po::value<std::string>(), "llama2.c .bin checkpoint or HF model directory (required)")
    ("tokenizer", po::value<std::string>(),
     "tokenizer for the output, any format qtune reads (tokenizer.json, tiktoken or sentencepiece "
     ".model, GPT-2 vocab.json, llama2.c .bin): written as tokenizer.json + tokenizer_config.json, "
     "a .model/.bin also kept as tokenizer.model/tokenizer.bin; default: the one found beside the "
     "model, if any")
    ("out", po::value<std::string>(), "output directory, new or empty (required)")
    ("overwrite", po::bool_switch(), "replace the contents of a non-empty --out")
    ("dtype", po::value<std::string>()->default_value("fp32"), "fp32 | bf16 | fp16")
    ("max-shard-gb", po::value<double>()->default_value(5.0),
     "split model.safetensors into shards of at most this many GB (HF's default 5)");
  // clang-format on
  po::variables_map vm = qtune::app::parse_flags(argc, argv, opts, "qtune-convert");
  if (vm.count("help")) {
    std::cout << "usage: qtune-convert --model X.bin [--tokenizer tok.model] --out DIR "
                 "[--dtype fp32|bf16]\n\n"
              << opts;
    return 0;
  }
  QTUNE_CHECK(vm.count("model"), "--model is required (see qtune-convert --help)");
  QTUNE_CHECK(vm.count("out"), "--out is required (see qtune-convert --help)");
  const std::string dtype_name = vm["dtype"].as<std::string>();
  torch::ScalarType dtype;
  if (dtype_name == "fp32" || dtype_name == "float32")
    dtype = torch::kFloat32;
  else if (dtype_name == "bf16" || dtype_name == "bfloat16")
    dtype = torch::kBFloat16;
  else if (dtype_name == "fp16" || dtype_name == "float16")
    dtype = torch::kFloat16;
  else
    throw qtune::UserError("--dtype must be fp32, bf16 or fp16, got \"" + dtype_name + "\"");
  const double shard_gb = vm["max-shard-gb"].as<double>();
  QTUNE_CHECK(shard_gb > 0, "--max-shard-gb must be > 0, got ", shard_gb);

  const std::string model_path =
      qtune::resolve_data_path(vm["model"].as<std::string>(), "--model");
  qtune::ModelFiles model = qtune::open_model(model_path);
  const std::string tokenizer =
      vm.count("tokenizer")
          ? qtune::resolve_data_path(vm["tokenizer"].as<std::string>(), "--tokenizer")
          : model.tokenizer_path;
  const std::string out = vm["out"].as<std::string>();
  if (!tokenizer.empty()) qtune::load_tokenizer(tokenizer);  // a bad one fails before any write
  qtune::prepare_output_directory(out, "--out", vm["overwrite"].as<bool>(),
                                  {model_path, tokenizer});
  qtune::save_hf_model(out, model.config, *model.weights, dtype, tokenizer,
                       static_cast<int64_t>(shard_gb * 1e9));
  std::cout << "wrote " << out << ": " << model.config.num_parameters() << " parameters, "
            << qtune::hf_torch_dtype_name(dtype)
            << (tokenizer.empty() ? ", no tokenizer"
                                  : ", tokenizer.json + tokenizer_config.json from " + tokenizer)
            << "\n";
  return 0;
}

}  // namespace

QTUNE_APP_MAIN("qtune-convert", run)
