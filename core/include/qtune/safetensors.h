// Hugging Face safetensors files (https://github.com/huggingface/safetensors): a memory-mapped,
// validating reader that hands out zero-copy tensors, and an atomic writer.
//
// Layout: u64 little-endian header length N, N bytes of UTF-8 JSON
//   {"<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"<key>": "<string>"}}   (optional)
// then the byte buffer; offsets are relative to the buffer start (byte 8 + N).
// Validation rules are listed in docs/formats.md.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "qtune/export.h"

namespace qtune {

/// Header entry of one tensor.
struct SafetensorsTensorInfo {
  std::string dtype;           // safetensors dtype name: "F32", "BF16", "I64", "BOOL", ...
  std::vector<int64_t> shape;  // may be empty (a scalar)
  uint64_t data_begin = 0;     // byte offsets relative to the buffer start, end exclusive
  uint64_t data_end = 0;
  int64_t numel() const;
  uint64_t nbytes() const { return data_end - data_begin; }
};

/// Bytes per element of a safetensors dtype name ("F32" -> 4); 0 when the name is unknown.
/// Known: F64 F32 F16 BF16 F8_E4M3 F8_E5M2 I64 I32 I16 I8 U64 U32 U16 U8 BOOL.
QTUNE_API int64_t safetensors_itemsize(const std::string& dtype);
/// The torch dtype of a safetensors dtype name; throws UserError when LibTorch has none
/// (U16/U32/U64 and, before LibTorch 2.1, F8_*).
QTUNE_API torch::ScalarType safetensors_to_torch(const std::string& dtype);
/// The safetensors name of a torch dtype; throws UserError for dtypes safetensors cannot hold
/// (complex, quantized).
QTUNE_API std::string torch_to_safetensors(torch::ScalarType dtype);

/// A read-only, memory-mapped safetensors file. Open it with SafetensorsFile::open; the header is
/// fully validated there, so later calls only fail for unknown names. Thread-safe after open.
class QTUNE_API SafetensorsFile : public std::enable_shared_from_this<SafetensorsFile> {
 public:
  /// Maps and validates `path`. Throws UserError naming the file, the tensor or key, and what
  /// was expected, for every malformed header (see docs/formats.md).
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  /// Tensor names, sorted.
  std::vector<std::string> names() const;
  bool has(const std::string& name) const { return infos_.count(name) != 0; }
  /// Header entry; throws UserError naming the file when `name` is absent.
  const SafetensorsTensorInfo& info(const std::string& name) const;
  /// The "__metadata__" map (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Size of the whole file in bytes.
  uint64_t file_size() const { return size_; }

  /// A CPU tensor viewing the mapped bytes (zero-copy). The mapping stays alive while any
  /// returned tensor (or a view of it) lives, even after this object is gone. The memory is
  /// mapped read-only: writing into the tensor crashes; clone() it first. When the data is not
  /// aligned to its element size (possible only in files from unusual writers) a copy is
  /// returned instead. Throws UserError for dtypes LibTorch lacks (use raw()).
  torch::Tensor tensor(const std::string& name) const;
  /// The raw little-endian bytes of a tensor inside the mapping (valid while this object lives).
  const uint8_t* raw(const std::string& name) const;
  /// Drops the whole pages of this tensor's bytes from the process's resident memory (a loader
  /// that has copied or quantized a tensor calls it so that a model is not resident twice while
  /// it loads). Views stay valid: their next access reads the pages again from the file.
  void release(const std::string& name) const;

 private:
  struct Mapping;
  SafetensorsFile() = default;
  std::string path_;
  std::shared_ptr<Mapping> mapping_;
  uint64_t size_ = 0;
  uint64_t buffer_offset_ = 0;  // 8 + header length
  std::map<std::string, SafetensorsTensorInfo> infos_;
  std::map<std::string, std::string> metadata_;
};

/// One tensor to write, produced on demand so a large model never needs to be in memory all at
/// once: `make()` is called once, in file order, and must return a tensor of exactly `dtype` and
/// `shape` (any device, any strides).
struct SafetensorsEntry {
  std::string name;
  torch::ScalarType dtype = torch::kFloat32;
  std::vector<int64_t> shape;
  std::function<torch::Tensor()> make;
};

/// Writes a safetensors file atomically (atomic_file.h): keys sorted in the JSON, "__metadata__"
/// first, header padded with spaces to a multiple of 8 bytes (as HF's writer does), data ordered
/// by decreasing element size then name so every tensor is aligned to its element size. Throws
/// UserError for an empty or reserved name, a tensor whose dtype/shape differs from the entry, or
/// an I/O error; the previous file at `path` is then left untouched.
QTUNE_API void write_safetensors(const std::string& path, std::vector<SafetensorsEntry> entries,
                                 const std::map<std::string, std::string>& metadata = {});

/// Convenience overload for tensors already in memory (contiguous CPU copies are taken one at a
/// time while writing).
QTUNE_API void write_safetensors(const std::string& path,
                                 const std::map<std::string, torch::Tensor>& tensors,
                                 const std::map<std::string, std::string>& metadata = {});

}  // namespace qtune
