// qtune-tokenize: encode a text file with any tokenizer qtune reads, report the ids, the encode
// throughput and whether decoding gives the text back; optionally write the ids (for oracles
// and for checking a tokenizer against another tool).
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>

#include "app_main.h"
#include "qtune/atomic_file.h"
#include "qtune/error.h"
#include "qtune/files.h"
#include "qtune/tokenizer.h"

namespace po = boost::program_options;

namespace {

int run(int argc, char** argv) {
  po::options_description opts("qtune-tokenize options");
  // clang-format off
  opts.add_options()
    ("help,h", "show this help")
    ("tokenizer", po::value<std::string>(), "tokenizer file, any format of docs/formats.md (required)")
    ("text", po::value<std::string>(), "text file, encoded as one string (required)")
    ("bos", po::bool_switch(), "put BOS in front (when the tokenizer has one)")
    ("eos", po::bool_switch(), "put EOS behind (when the tokenizer has one)")
    ("ids-out", po::value<std::string>(), "write the ids to this file, space-separated, one line")
    ("repeat", po::value<int>()->default_value(1), "encode this many times, report the fastest");
  // clang-format on
  po::variables_map vm = qtune::app::parse_flags(argc, argv, opts, "qtune-tokenize");
  if (vm.count("help")) {
    std::cout << "usage: qtune-tokenize --tokenizer PATH --text FILE [--bos] [--eos] "
                 "[--ids-out FILE] [--repeat N]\n\n"
              << opts;
    return 0;
  }
  QTUNE_CHECK(vm.count("tokenizer"), "--tokenizer is required (see qtune-tokenize --help)");
  QTUNE_CHECK(vm.count("text"), "--text is required (see qtune-tokenize --help)");
  const int repeat = vm["repeat"].as<int>();
  QTUNE_CHECK(repeat >= 1, "--repeat must be >= 1, got ", repeat);
  const bool bos = vm["bos"].as<bool>(), eos = vm["eos"].as<bool>();

  auto tok = qtune::load_tokenizer(vm["tokenizer"].as<std::string>());
  const std::string path = vm["text"].as<std::string>();
  const std::string text = qtune::read_text_file(path);
  std::vector<int> ids;
  double best = 1e300;
  for (int r = 0; r < repeat; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    ids = tok->encode(text, bos, eos);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  const bool same = tok->decode(ids) == text;
  std::printf("%s: %zu bytes -> %zu ids in %.3f s (%.2f MB/s, fastest of %d); decode: %s\n",
              path.c_str(), text.size(), ids.size(), best, text.size() / 1e6 / best, repeat,
              same ? "identical to the text" : "DIFFERS from the text");
  if (vm.count("ids-out")) {
    std::string out;
    out.reserve(ids.size() * 6);
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i) out += ' ';
      out += std::to_string(ids[i]);
    }
    qtune::atomic_write_string(vm["ids-out"].as<std::string>(), out + "\n");
  }
  return 0;
}

}  // namespace

QTUNE_APP_MAIN("qtune-tokenize", run)
