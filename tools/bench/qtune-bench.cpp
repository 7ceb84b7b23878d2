// qtune-bench: compare the quantization backends the registry finds on memory, speed and
// accuracy, side by side, in one run (quant, ppl, finetune, scale, or all). Writes CSV, markdown
// and gnuplot PNGs under --out; the measuring logic is beside this file (bench.h).
#include <spdlog/spdlog.h>
#include <torch/cuda.h>

#include <boost/dll/runtime_symbol_info.hpp>
#include <boost/program_options.hpp>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "app_main.h"
#include "bench.h"
#include "qtune/error.h"
#include "qtune/registry.h"

namespace fs = std::filesystem;
namespace po = boost::program_options;

namespace {

// The option sets measured when --quant_sets is absent. Any quantization plugin found that this
// list does not name is still measured with its default options.
constexpr const char* kDefaultQuantSets =
    "nf4:{};"
    "nf4:{\"double_quant\":false};"
    "hqq:{\"nbits\":4};"
    "hqq:{\"nbits\":4,\"group_size\":128};"
    "hqq:{\"nbits\":3};"
    "hqq:{\"nbits\":2,\"group_size\":16};"
    "hqq:{\"nbits\":2};"
    "hqq:{\"nbits\":8};"
    "int8:{};"
    "int8:{\"group_size\":128}";
// Llama-2-7B's projection shapes, plus the real model and a heavy-tailed matrix.
constexpr const char* kDefaultMatrices =
    "model,gaussian:4096x4096,student_t:4096x4096,gaussian:11008x4096,gaussian:4096x11008";
constexpr const char* kQuickMatrices = "model,gaussian:1024x1024,student_t:1024x1024";

const char* kUsage =
    "usage: qtune-bench <quant|ppl|finetune|scale|all> [options]\n\n"
    "  quant     every option set on real and synthetic matrices: bits/param, error, quantize\n"
    "            time, dequantize GB/s (and vs memcpy), linear fwd+bwd vs dense fp32/bf16\n"
    "  ppl       perplexity of --model on --ppl_text, unquantized and quantized by each set\n"
    "  finetune  the same short fine-tune for full, lora and qlora with each set\n"
    "  scale     lora vs qlora peak RSS and step time on synthetic 15M..1B models\n"
    "  all       everything above, then report.md (and --doc)\n\n"
    "Writes <out>/<sub-command>.md, .csv and .png (gnuplot). Example:\n"
    "  qtune-bench all --out docs/bench/\n"
    "  qtune-bench quant --quant_sets 'nf4:{};hqq:{\"nbits\":3}' --matrices gaussian:4096x4096\n";

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

bool has_marker(const std::string& path) {
  std::ifstream in(path);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str().find("<!-- qtune-bench:begin -->") != std::string::npos;
}

int run(int argc, char** argv) {
  auto& registry = qtune::Registry::global();
  // The hidden sub-commands of the child processes come first: they take no flags.
  if (argc >= 2 && qtune::is_bench_child_command(argv[1])) {
    registry.scan(qtune::Registry::default_dirs(""));
    return qtune::bench_child_main(std::vector<std::string>(argv + 1, argv + argc), registry);
  }

  po::options_description opts("qtune-bench options");
  // clang-format off
  opts.add_options()
    ("help,h", "show this help")
    ("out", po::value<std::string>()->default_value("bench-out"), "output folder")
    ("device", po::value<std::string>()->default_value("cpu"), "cpu | cuda (when LibTorch has CUDA)")
    ("threads", po::value<int>()->default_value(0), "intra-op threads (0 = every core)")
    ("quick", "a smaller, faster set of everything")
    ("repeats", po::value<int>(), "timed repeats per measurement; the median is reported (5, quick 3)")
    ("warmup", po::value<int>(), "untimed runs before them (1)")
    ("quant_sets", po::value<std::string>(), "option sets: 'name:{json};name:{json}' (default: a built-in list + every other plugin's defaults)")
    ("scale_sets", po::value<std::string>(), "option sets for scale (default: the first set of each backend)")
    ("matrices", po::value<std::string>(), "quant: comma list of model, gaussian:OUTxIN, student_t:OUTxIN")
    ("tokens", po::value<int64_t>(), "quant: tokens in the linear timing (128, quick 32)")
    ("seed", po::value<uint64_t>()->default_value(0), "random seed")
    ("model", po::value<std::string>(), "ppl/finetune: model (default stories260K.bin)")
    ("tokenizer", po::value<std::string>(), "its tokenizer (default tok512.bin; '' = beside the model)")
    ("ppl_text", po::value<std::string>(), "ppl: text file (default tinystories_val_head.txt)")
    ("ppl_seq_len", po::value<int64_t>(), "ppl: tokens per block (default: the model's context)")
    ("ppl_max_blocks", po::value<int64_t>(), "ppl: at most this many blocks (64, quick 16; 0 = the whole text)")
    ("ppl_skip_modules", po::value<std::string>(), "ppl: comma list of module patterns kept dense in the quantized runs (quant.skip_modules syntax: lm_head, down_proj, layers.0)")
    ("ppl_scoring", po::value<std::string>(), "ppl: stream (every token of the text as one stream) | llama (llama-perplexity's chunks: BOS first, second half scored)")
    ("finetune_data", po::value<std::string>(), "finetune: training text (default tinyshakespeare.txt)")
    ("finetune_steps", po::value<int64_t>(), "finetune: optimizer steps (100, quick 40)")
    ("finetune_batch", po::value<int64_t>(), "finetune: sequences per step (8)")
    ("finetune_seq_len", po::value<int64_t>(), "finetune: tokens per sequence (128)")
    ("finetune_lr", po::value<double>(), "finetune: LoRA/QLoRA learning rate (3e-3)")
    ("finetune_full_lr", po::value<double>(), "finetune: full fine-tune learning rate (1e-3)")
    ("finetune_dtype", po::value<std::string>(), "finetune: compute dtype fp32 | bf16 (fp32)")
    ("finetune_eval_every", po::value<int64_t>(), "finetune: evaluate every N steps (20)")
    ("finetune_pack", "finetune: data.pack (several records per sequence, no cross-attention)")
    ("finetune_ranks", po::value<std::string>(), "finetune: comma list of rank counts each configuration runs on, data parallel with the same global batch (1)")
    ("finetune_size", po::value<std::string>(), "finetune: a synthetic model size (tiny, 15M, 60M, ...) instead of --model")
    ("finetune_threads", po::value<int>()->default_value(1),
     "finetune: threads per run (0 = --threads; 1 is fastest and steadiest at stories260K size)")
    ("adapter", po::value<std::string>(), "adapter plugin (default: lora when found, else the first adapter plugin)")
    ("adapter_options", po::value<std::string>(), "adapter options as JSON, e.g. '{\"rank\":16}'")
    ("scale_sizes", po::value<std::string>(), "scale: comma list of tiny, 15M, 60M, 250M, 1B, 7B, each optionally :<layers> (fewer decoder layers, e.g. 7B:2; quick 15M,60M)")
    ("scale_dtypes", po::value<std::string>(), "scale: comma list of compute dtypes (bf16)")
    ("scale_steps", po::value<int64_t>(), "scale: timed steps per configuration (4, quick 2)")
    ("scale_batch", po::value<int64_t>(), "scale: sequences per step (1)")
    ("scale_seq_len", po::value<int64_t>(), "scale: tokens per sequence (512, quick 128)")
    ("scale_checkpointing", "scale: activation checkpointing (each decoder layer recomputed in backward)")
    ("scale_ranks", po::value<int64_t>(), "scale: data-parallel ranks per configuration (1; each with --scale_batch sequences, the threads split between them)")
    ("scale_shard_base", "scale: with --scale_ranks > 1, shard each qlora base over the ranks (dist.shard_base)")
    ("scale_shard_optimizer", "scale: with --scale_ranks > 1, spread AdamW's moments over the ranks (dist.shard_optimizer)")
    ("plugin_dir", po::value<std::string>()->default_value(""), "search this plugin folder first")
    ("work_dir", po::value<std::string>(), "folder for the fine-tune/scale runs (default: a temp folder)")
    ("keep_runs", "keep the run folders (logs, metrics, adapters)")
    ("doc", po::value<std::string>(), "markdown page whose qtune-bench section to regenerate (default: benchmarks.md beside --out when it has the markers; '' = none)")
    ("list-plugins", "list the plugins found and exit")
    ("verbose,v", "debug logging")
    ("command", po::value<std::string>(), "sub-command");
  // clang-format on
  po::positional_options_description pos;
  pos.add("command", 1);
  po::variables_map vm = qtune::app::parse_flags(argc, argv, opts, "qtune-bench", &pos);
  if (vm.count("help") || (argc == 1)) {
    std::cout << kUsage << "\n" << opts;
    return 0;
  }
  if (vm.count("verbose")) spdlog::set_level(spdlog::level::debug);

  qtune::BenchOptions o;
  o.plugin_dir = vm["plugin_dir"].as<std::string>();
  QTUNE_CHECK(o.plugin_dir.empty() || fs::is_directory(o.plugin_dir),
              "--plugin_dir: not a directory: ", o.plugin_dir);
  registry.scan(qtune::Registry::default_dirs(o.plugin_dir));
  for (const auto& e : registry.errors()) spdlog::warn("plugin not loaded: {}", e);
  if (vm.count("list-plugins")) {
    std::fputs(qtune::plugin_listing(registry).c_str(), stdout);
    return 0;
  }
  QTUNE_CHECK(vm.count("command"),
              "no sub-command given: expected quant, ppl, finetune, scale or all");
  const std::string command = vm["command"].as<std::string>();
  const std::vector<std::string> known{"quant", "ppl", "finetune", "scale", "all"};
  QTUNE_CHECK(std::find(known.begin(), known.end(), command) != known.end(),
              "unknown sub-command '", command, "', expected quant, ppl, finetune, scale or all");

  // The children find the same plugins first.
  if (!o.plugin_dir.empty()) {
    const char* old = std::getenv("QTUNE_PLUGIN_PATH");
    const std::string path =
        fs::absolute(o.plugin_dir).string() + (old && *old ? std::string(":") + old : "");
    setenv("QTUNE_PLUGIN_PATH", path.c_str(), 1);
  }

  const bool quick = vm.count("quick") > 0;
  o.out_dir = vm["out"].as<std::string>();
  try {
    o.device = torch::Device(vm["device"].as<std::string>());
  } catch (const std::exception&) {
    throw qtune::UserError("--device: expected cpu or cuda[:N], got '" +
                           vm["device"].as<std::string>() + "'");
  }
  QTUNE_CHECK(!o.device.is_cuda() || torch::cuda::is_available(), "--device ", o.device.str(),
              ": this LibTorch has no CUDA or no GPU is visible");
  QTUNE_CHECK(o.device.is_cpu() || o.device.is_cuda(), "--device: expected cpu or cuda, got ",
              o.device.str());
  o.threads = vm["threads"].as<int>();
  QTUNE_CHECK(o.threads >= 0, "--threads must be >= 0, got ", o.threads);
  o.seed = vm["seed"].as<uint64_t>();
  o.repeats = vm.count("repeats") ? vm["repeats"].as<int>() : (quick ? 3 : 5);
  o.warmup = vm.count("warmup") ? vm["warmup"].as<int>() : 1;
  QTUNE_CHECK(o.repeats >= 1, "--repeats must be >= 1, got ", o.repeats);
  QTUNE_CHECK(o.warmup >= 0, "--warmup must be >= 0, got ", o.warmup);
  o.self_exe = boost::dll::program_location().string();
  o.command_line.assign(argv, argv + argc);
  if (vm.count("work_dir")) o.work_dir = vm["work_dir"].as<std::string>();
  o.keep_runs = vm.count("keep_runs") > 0;

  const bool explicit_sets = vm.count("quant_sets") > 0;
  o.quant_sets = qtune::select_quant_sets(
      qtune::parse_quant_sets(
          explicit_sets ? vm["quant_sets"].as<std::string>() : kDefaultQuantSets, "--quant_sets"),
      registry, !explicit_sets, "--quant_sets");
  if (vm.count("scale_sets"))
    o.scale_sets = qtune::select_quant_sets(
        qtune::parse_quant_sets(vm["scale_sets"].as<std::string>(), "--scale_sets"), registry,
        false, "--scale_sets");

  o.matrices = split_list(vm.count("matrices") ? vm["matrices"].as<std::string>()
                                               : (quick ? kQuickMatrices : kDefaultMatrices));
  o.linear_tokens = vm.count("tokens") ? vm["tokens"].as<int64_t>() : (quick ? 32 : 128);
  if (vm.count("model")) o.model_path = vm["model"].as<std::string>();
  if (vm.count("tokenizer")) o.tokenizer_path = vm["tokenizer"].as<std::string>();
  if (vm.count("ppl_text")) o.ppl_text = vm["ppl_text"].as<std::string>();
  if (vm.count("ppl_seq_len")) o.ppl_seq_len = vm["ppl_seq_len"].as<int64_t>();
  if (vm.count("ppl_scoring")) o.ppl_scoring = vm["ppl_scoring"].as<std::string>();
  if (vm.count("ppl_skip_modules"))
    o.ppl_skip_modules = split_list(vm["ppl_skip_modules"].as<std::string>());
  o.ppl_max_blocks =
      vm.count("ppl_max_blocks") ? vm["ppl_max_blocks"].as<int64_t>() : (quick ? 16 : 64);
  if (vm.count("finetune_data")) o.finetune_data = vm["finetune_data"].as<std::string>();
  o.finetune_steps =
      vm.count("finetune_steps") ? vm["finetune_steps"].as<int64_t>() : (quick ? 40 : 100);
  if (vm.count("finetune_batch")) o.finetune_batch = vm["finetune_batch"].as<int64_t>();
  if (vm.count("finetune_seq_len")) o.finetune_seq_len = vm["finetune_seq_len"].as<int64_t>();
  if (vm.count("finetune_lr")) o.finetune_lr = vm["finetune_lr"].as<double>();
  if (vm.count("finetune_full_lr")) o.finetune_full_lr = vm["finetune_full_lr"].as<double>();
  if (vm.count("finetune_dtype")) o.finetune_dtype = vm["finetune_dtype"].as<std::string>();
  o.finetune_pack = vm.count("finetune_pack") > 0;
  if (vm.count("finetune_size")) o.finetune_size = vm["finetune_size"].as<std::string>();
  if (vm.count("finetune_ranks")) {
    o.finetune_ranks.clear();
    for (const auto& n : split_list(vm["finetune_ranks"].as<std::string>())) {
      QTUNE_CHECK(n.size() <= 4 && n.find_first_not_of("0123456789") == std::string::npos,
                  "--finetune_ranks: expected a comma list of positive integers, got '", n, "'");
      o.finetune_ranks.push_back(std::stoll(n));
    }
  }
  o.finetune_threads = vm["finetune_threads"].as<int>();
  o.finetune_eval_every =
      vm.count("finetune_eval_every") ? vm["finetune_eval_every"].as<int64_t>() : (quick ? 10 : 20);
  if (vm.count("adapter")) o.adapter = vm["adapter"].as<std::string>();
  if (vm.count("adapter_options")) {
    o.adapter_options = qtune::app::json_flag(vm, "adapter_options");
    QTUNE_CHECK(o.adapter_options.is_object(),
                "--adapter_options: expected a JSON object like "
                "{\"rank\":16}, got ",
                o.adapter_options.dump());
  }
  if (vm.count("scale_sizes"))
    o.scale_sizes = split_list(vm["scale_sizes"].as<std::string>());
  else if (quick)
    o.scale_sizes = {"15M", "60M"};
  if (vm.count("scale_dtypes")) o.scale_dtypes = split_list(vm["scale_dtypes"].as<std::string>());
  o.scale_steps = vm.count("scale_steps") ? vm["scale_steps"].as<int64_t>() : (quick ? 2 : 4);
  if (vm.count("scale_batch")) o.scale_batch = vm["scale_batch"].as<int64_t>();
  o.scale_checkpointing = vm.count("scale_checkpointing") > 0;
  if (vm.count("scale_ranks")) o.scale_ranks = vm["scale_ranks"].as<int64_t>();
  o.scale_shard_base = vm.count("scale_shard_base") > 0;
  o.scale_shard_optimizer = vm.count("scale_shard_optimizer") > 0;
  o.scale_seq_len =
      vm.count("scale_seq_len") ? vm["scale_seq_len"].as<int64_t>() : (quick ? 128 : 512);

  // The page regenerated by default: benchmarks.md beside the output folder (docs/bench/ ->
  // docs/benchmarks.md), only when it carries the markers of a generated section.
  std::string doc;
  if (vm.count("doc")) {
    doc = vm["doc"].as<std::string>();
  } else {
    fs::path out = fs::path(o.out_dir).lexically_normal();
    if (!out.has_filename()) out = out.parent_path();  // "docs/bench/" -> "docs/bench"
    const fs::path beside = out.parent_path() / "benchmarks.md";
    if (has_marker(beside.string())) doc = beside.string();
  }

  qtune::validate_bench_options(o, registry, command);
  // scale measures its own sets (--scale_sets, or each backend's first), the rest --quant_sets.
  std::string sets = std::to_string(o.quant_sets.size()) + " option sets";
  if (command == "scale")
    sets = o.scale_sets.empty() ? "each backend's first option set"
                                : std::to_string(o.scale_sets.size()) + " option sets";
  spdlog::info("qtune-bench {}: {}, {} threads, device {}, out {}", command, sets,
               o.threads > 0 ? o.threads : 0, o.device.str(), o.out_dir);
  auto run_one = [&](const std::string& which) {
    qtune::BenchResult r;
    if (which == "quant")
      r = qtune::bench_quant(o, registry);
    else if (which == "ppl")
      r = qtune::bench_ppl(o, registry);
    else if (which == "finetune")
      r = qtune::bench_finetune(o, registry);
    else
      r = qtune::bench_scale(o, registry);
    const std::string md = qtune::write_bench_result(r, o);
    std::cout << md << std::flush;
  };
  if (command == "all") {
    for (const char* c : {"quant", "ppl", "finetune", "scale"}) run_one(c);
  } else {
    run_one(command);
  }
  qtune::write_bench_report(o, doc);
  std::printf("wrote %s/report.md%s%s\n", o.out_dir.c_str(), doc.empty() ? "" : " and ",
              doc.c_str());
  return 0;
}

}  // namespace

QTUNE_APP_MAIN("qtune-bench", run)
