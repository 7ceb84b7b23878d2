// The main() every qtune program shares: run the program, turn a UserError (something the
// person can fix) into one line "<program>: error: ..." and exit code 2, an InternalError (a
// broken invariant or a misbehaving plugin) into "<program>: internal error: ..." and exit code 3,
// and anything else into "<program>: internal error: ..." and exit code 1. Nothing else in qtune
// exits. Also the flag parsing every program does the same way.
#pragma once

#include <c10/util/Exception.h>

#include <boost/program_options.hpp>
#include <csignal>
#include <cstdio>
#include <exception>
#include <string>

#include "qtune/error.h"
#include "qtune/options.h"

namespace qtune::app {

template <typename Run>
int guarded_main(const char* program, Run&& run) {
  // A write past the file-size limit (ulimit -f) fails with EFBIG and its message instead of
  // killing the process mid-save; atomic writes then leave the previous file intact.
  std::signal(SIGXFSZ, SIG_IGN);
  try {
    return run();
  } catch (const UserError& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    return 2;
  } catch (const InternalError& e) {
    std::fprintf(stderr, "%s: internal error: %s\n", program, e.what());
    return 3;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s: internal error: %s\n", program, e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: internal error: %s\n", program, e.what());
    return 1;
  }
}

/// Parses the command line (`pos` names positional arguments, if any); a malformed flag is a
/// UserError pointing at `<program> --help`.
inline boost::program_options::variables_map parse_flags(
    int argc, char** argv, const boost::program_options::options_description& opts,
    const char* program,
    const boost::program_options::positional_options_description* pos = nullptr) {
  namespace po = boost::program_options;
  po::variables_map vm;
  try {
    po::command_line_parser parser(argc, argv);
    parser.options(opts);
    if (pos) parser.positional(*pos);
    po::store(parser.run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    throw UserError(std::string(e.what()) + " (see " + program + " --help)");
  }
  return vm;
}

/// The JSON value of --`flag` (an empty object when it is absent); text that is not JSON is a
/// UserError naming the flag.
inline Json json_flag(const boost::program_options::variables_map& vm, const char* flag) {
  if (!vm.count(flag)) return Json::object();
  try {
    return Json::parse(vm[flag].as<std::string>());
  } catch (const Json::exception& e) {
    throw UserError(std::string("--") + flag + " is not valid JSON: " + e.what());
  }
}

}  // namespace qtune::app

/// Defines main() calling `int RUN(int argc, char** argv)` under guarded_main.
#define QTUNE_APP_MAIN(PROGRAM, RUN)                                             \
  int main(int argc, char** argv) {                                              \
    return ::qtune::app::guarded_main(PROGRAM, [&] { return RUN(argc, argv); }); \
  }
