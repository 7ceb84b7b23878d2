// Internal: a read-only memory mapping of a whole file, shared by the tensors that view it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace qtune::detail {

class MappedFile {
 public:
  /// Maps `path` read-only (MAP_PRIVATE). `what` describes the file in errors ("llama2.c
  /// checkpoint"). An empty file gives data() == nullptr and size() == 0.
  static std::shared_ptr<MappedFile> open(const std::string& path, const std::string& what);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return static_cast<const uint8_t*>(addr_); }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  void* addr_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

}  // namespace qtune::detail
