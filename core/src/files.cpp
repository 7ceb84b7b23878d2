// Reading small files and sizing directories (see files.h).
#include "qtune/files.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "qtune/error.h"

namespace qtune {

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  QTUNE_CHECK(in.good(), "cannot read ", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Json read_json_file(const std::string& path) {
  const std::string text = read_text_file(path);
  try {
    return Json::parse(text);
  } catch (const Json::exception& e) {
    throw UserError(path + ": not valid JSON (" + e.what() + ")");
  }
}

int64_t directory_bytes(const std::string& dir) {
  int64_t n = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    if (e.is_regular_file(ec)) n += static_cast<int64_t>(e.file_size(ec));
  return n;
}

}  // namespace qtune
