// safetensors reader (mmap + header validation + zero-copy tensors) and atomic writer.
#include "qtune/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "qtune/atomic_file.h"
#include "qtune/error.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data is little-endian; big-endian hosts would need byte swapping");

namespace qtune {

// A header longer than this is certainly not a real one (HF's own reader caps it at 100 MB too);
// refusing it early stops a corrupt length field from making us parse gigabytes.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;

// ---------------------------------------------------------------------------------------------
// dtypes

namespace {
struct DtypeRow {
  const char* name;
  int64_t itemsize;
};
constexpr DtypeRow kDtypes[] = {{"F64", 8},     {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F8_E4M3", 1},
                                {"F8_E5M2", 1}, {"I64", 8}, {"I32", 4}, {"I16", 2},  {"I8", 1},
                                {"U64", 8},     {"U32", 4}, {"U16", 2}, {"U8", 1},   {"BOOL", 1}};

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
#define QTUNE_HAS_FLOAT8 1
#endif
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
#define QTUNE_HAS_UINT_WIDE 1
#endif
}  // namespace

int64_t safetensors_itemsize(const std::string& dtype) {
  for (const auto& row : kDtypes)
    if (dtype == row.name) return row.itemsize;
  return 0;
}

torch::ScalarType safetensors_to_torch(const std::string& dtype) {
  if (dtype == "F64") return torch::kFloat64;
  if (dtype == "F32") return torch::kFloat32;
  if (dtype == "F16") return torch::kFloat16;
  if (dtype == "BF16") return torch::kBFloat16;
  if (dtype == "I64") return torch::kInt64;
  if (dtype == "I32") return torch::kInt32;
  if (dtype == "I16") return torch::kInt16;
  if (dtype == "I8") return torch::kInt8;
  if (dtype == "U8") return torch::kUInt8;
  if (dtype == "BOOL") return torch::kBool;
#ifdef QTUNE_HAS_FLOAT8
  if (dtype == "F8_E4M3") return torch::kFloat8_e4m3fn;
  if (dtype == "F8_E5M2") return torch::kFloat8_e5m2;
#endif
#ifdef QTUNE_HAS_UINT_WIDE
  if (dtype == "U16") return torch::kUInt16;
  if (dtype == "U32") return torch::kUInt32;
  if (dtype == "U64") return torch::kUInt64;
#endif
  throw UserError("safetensors dtype " + dtype +
                  " has no LibTorch " TORCH_VERSION
                  " equivalent (read its bytes with SafetensorsFile::raw)");
}

std::string torch_to_safetensors(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat64:
      return "F64";
    case torch::kFloat32:
      return "F32";
    case torch::kFloat16:
      return "F16";
    case torch::kBFloat16:
      return "BF16";
    case torch::kInt64:
      return "I64";
    case torch::kInt32:
      return "I32";
    case torch::kInt16:
      return "I16";
    case torch::kInt8:
      return "I8";
    case torch::kUInt8:
      return "U8";
    case torch::kBool:
      return "BOOL";
#ifdef QTUNE_HAS_FLOAT8
    case torch::kFloat8_e4m3fn:
      return "F8_E4M3";
    case torch::kFloat8_e5m2:
      return "F8_E5M2";
#endif
#ifdef QTUNE_HAS_UINT_WIDE
    case torch::kUInt16:
      return "U16";
    case torch::kUInt32:
      return "U32";
    case torch::kUInt64:
      return "U64";
#endif
    default:
      break;
  }
  throw UserError(std::string("torch dtype ") + c10::toString(dtype) +
                  " cannot be stored in safetensors");
}

int64_t SafetensorsTensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// ---------------------------------------------------------------------------------------------
// reader

struct SafetensorsFile::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr) ::munmap(addr, size);
  }
};

SafetensorsFile::~SafetensorsFile() = default;

namespace {

// Reads a non-negative JSON integer that fits in uint64; `what` names it in the message.
uint64_t json_uint(const nlohmann::json& v, const std::string& where) {
  QTUNE_CHECK(v.is_number_integer() && (v.is_number_unsigned() || v.get<int64_t>() >= 0), where,
              " must be a non-negative integer, got ", v.dump());
  return v.get<uint64_t>();
}

// One header entry {dtype, shape, data_offsets}, checked against itself and the buffer size.
SafetensorsTensorInfo parse_tensor_entry(const std::string& path, const std::string& key,
                                         const nlohmann::json& v, uint64_t buffer_size) {
  const std::string where = path + ": tensor \"" + key + "\"";
  QTUNE_CHECK(v.is_object(), where, " must be an object {dtype, shape, data_offsets}, got ",
              v.type_name());
  SafetensorsTensorInfo info;
  QTUNE_CHECK(v.contains("dtype") && v["dtype"].is_string(), where,
              ": \"dtype\" must be a string such as \"F32\"");
  info.dtype = v["dtype"].get<std::string>();
  const int64_t itemsize = safetensors_itemsize(info.dtype);
  QTUNE_CHECK(itemsize > 0, where, ": unknown dtype \"", info.dtype,
              "\" (expected one of F64 F32 F16 BF16 F8_E4M3 F8_E5M2 I64 I32 I16 I8 U64 U32 "
              "U16 U8 BOOL)");

  QTUNE_CHECK(v.contains("shape") && v["shape"].is_array(), where,
              ": \"shape\" must be an array of non-negative integers");
  uint64_t numel = 1;
  bool overflow = false;
  for (size_t d = 0; d < v["shape"].size(); ++d) {
    uint64_t dim = json_uint(v["shape"][d], where + ": shape[" + std::to_string(d) + "]");
    QTUNE_CHECK(dim <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), where,
                ": shape[", d, "] = ", dim, " is too large");
    info.shape.push_back(static_cast<int64_t>(dim));
    if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / dim) overflow = true;
    numel *= dim;
  }
  QTUNE_CHECK(
      v.contains("data_offsets") && v["data_offsets"].is_array() && v["data_offsets"].size() == 2,
      where, ": \"data_offsets\" must be an array [begin, end]");
  info.data_begin = json_uint(v["data_offsets"][0], where + ": data_offsets[0]");
  info.data_end = json_uint(v["data_offsets"][1], where + ": data_offsets[1]");
  QTUNE_CHECK(info.data_begin <= info.data_end, where, ": data_offsets [", info.data_begin, ", ",
              info.data_end, "] has begin > end");
  QTUNE_CHECK(info.data_end <= buffer_size, where, ": data_offsets [", info.data_begin, ", ",
              info.data_end, "] out of bounds: the data buffer is ", buffer_size, " bytes");
  const uint64_t item = static_cast<uint64_t>(itemsize);
  QTUNE_CHECK(!overflow && numel <= std::numeric_limits<uint64_t>::max() / item, where,
              ": shape ", shape_str(info.shape), " is too large");
  QTUNE_CHECK(info.nbytes() == numel * item, where, ": data_offsets [", info.data_begin, ", ",
              info.data_end, "] hold ", info.nbytes(), " bytes but dtype ", info.dtype,
              " with shape ", shape_str(info.shape), " needs ", numel * item, " bytes");
  return info;
}

// Tensors must not share bytes. Gaps between tensors (and trailing bytes) are accepted: some
// writers align tensors, and nothing is lost by skipping unused bytes. HF's Rust reader is
// stricter there.
void check_disjoint(const std::string& path,
                    const std::map<std::string, SafetensorsTensorInfo>& infos) {
  std::vector<std::pair<uint64_t, const std::string*>> starts;
  for (const auto& kv : infos)
    if (kv.second.nbytes() > 0) starts.emplace_back(kv.second.data_begin, &kv.first);
  std::sort(starts.begin(), starts.end());
  for (size_t i = 1; i < starts.size(); ++i) {
    const auto& prev = infos.at(*starts[i - 1].second);
    const auto& cur = infos.at(*starts[i].second);
    QTUNE_CHECK(cur.data_begin >= prev.data_end, "safetensors file ", path, ": tensor \"",
                *starts[i].second, "\" bytes [", cur.data_begin, ", ", cur.data_end,
                ") overlap tensor \"", *starts[i - 1].second, "\" bytes [", prev.data_begin, ", ",
                prev.data_end, "); expected disjoint data_offsets");
  }
}

}  // namespace

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  QTUNE_CHECK(fd >= 0, "cannot open safetensors file ", path, ": ", std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw UserError("safetensors file " + path + " is not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    throw UserError("safetensors file " + path + " is " + std::to_string(size) +
                    " bytes, shorter than the 8-byte header length field");
  }
  void* addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);  // the mapping keeps the file referenced
  QTUNE_CHECK(addr != MAP_FAILED, "cannot mmap ", path, ": ", std::strerror(map_errno));

  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->mapping_ = std::make_shared<Mapping>();
  f->mapping_->addr = addr;
  f->mapping_->size = size;
  f->size_ = size;

  const auto* bytes = static_cast<const uint8_t*>(addr);
  uint64_t n = 0;
  std::memcpy(&n, bytes, 8);  // little-endian host (static_assert above)
  QTUNE_CHECK(n <= kMaxHeaderBytes, "safetensors file ", path, ": header length ", n,
              " bytes is absurd (limit ", kMaxHeaderBytes,
              "); the file is corrupt or not safetensors");
  QTUNE_CHECK(n <= size - 8, "safetensors file ", path, ": header length ", n,
              " runs past the end of the file (", size, " bytes, so at most ", size - 8, ")");
  f->buffer_offset_ = 8 + n;
  const uint64_t buffer_size = size - 8 - n;

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(reinterpret_cast<const char*>(bytes + 8),
                                   reinterpret_cast<const char*>(bytes + 8 + n));
  } catch (const nlohmann::json::exception& e) {
    throw UserError("safetensors file " + path + ": header is not valid JSON (" + e.what() + ")");
  }
  QTUNE_CHECK(header.is_object(), "safetensors file ", path, ": header must be a JSON object, got ",
              header.type_name());

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& key = it.key();
    const auto& v = it.value();
    if (key == "__metadata__") {
      QTUNE_CHECK(v.is_object(), path, ": \"__metadata__\" must be an object of strings, got ",
                  v.type_name());
      for (auto m = v.begin(); m != v.end(); ++m) {
        QTUNE_CHECK(m.value().is_string(), path, ": __metadata__.", m.key(),
                    " must be a string, got ", m.value().dump());
        f->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    f->infos_.emplace(key, parse_tensor_entry(path, key, v, buffer_size));
  }

  check_disjoint(path, f->infos_);
  return f;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(infos_.size());
  for (const auto& kv : infos_) out.push_back(kv.first);
  return out;
}

const SafetensorsTensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = infos_.find(name);
  QTUNE_CHECK(it != infos_.end(), "tensor \"", name, "\" not found in ", path_);
  return it->second;
}

const uint8_t* SafetensorsFile::raw(const std::string& name) const {
  const auto& i = info(name);
  return static_cast<const uint8_t*>(mapping_->addr) + buffer_offset_ + i.data_begin;
}

void SafetensorsFile::release(const std::string& name) const {
  const auto& i = info(name);
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(raw(name));
  const uintptr_t first = (begin + page - 1) / page * page;  // only pages the tensor fills
  const uintptr_t last = (begin + i.nbytes()) / page * page;
  // A private read-only file mapping: the pages were never written, so dropping them loses
  // nothing. Advice only; failure changes nothing but the resident size.
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

torch::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const auto& i = info(name);
  const torch::ScalarType dtype = safetensors_to_torch(i.dtype);
  auto options = torch::TensorOptions().dtype(dtype).device(torch::kCPU);
  void* ptr = const_cast<uint8_t*>(raw(name));
  if (i.numel() == 0) return torch::empty(i.shape, options);
  if (reinterpret_cast<uintptr_t>(ptr) % safetensors_itemsize(i.dtype) != 0)
    return torch::from_blob(ptr, i.shape, options).clone();
  std::shared_ptr<Mapping> keep = mapping_;
  return torch::from_blob(
      ptr, i.shape, [keep](void*) mutable { keep.reset(); }, options);
}

// ---------------------------------------------------------------------------------------------
// writer

void write_safetensors(const std::string& path, std::vector<SafetensorsEntry> entries,
                       const std::map<std::string, std::string>& metadata) {
  std::set<std::string> seen;
  for (const auto& e : entries) {
    QTUNE_CHECK(!e.name.empty(), "cannot write ", path, ": empty tensor name");
    QTUNE_CHECK(e.name != "__metadata__", "cannot write ", path,
                ": \"__metadata__\" is reserved and cannot name a tensor");
    QTUNE_CHECK(seen.insert(e.name).second, "cannot write ", path, ": tensor \"", e.name,
                "\" given twice");
    for (int64_t d : e.shape)
      QTUNE_CHECK(d >= 0, "cannot write ", path, ": tensor \"", e.name, "\" has negative shape ",
                  shape_str(e.shape));
    QTUNE_CHECK(static_cast<bool>(e.make), "cannot write ", path, ": tensor \"", e.name,
                "\" has no producer");
  }

  // Data order: larger elements first, then by name, so that with an 8-aligned buffer start
  // every tensor is aligned to its element size (what HF's writer does too).
  std::vector<size_t> order(entries.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::vector<std::string> st_dtype(entries.size());
  std::vector<uint64_t> nbytes(entries.size()), begin(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    st_dtype[i] = torch_to_safetensors(entries[i].dtype);
    uint64_t n = static_cast<uint64_t>(safetensors_itemsize(st_dtype[i]));
    for (int64_t d : entries[i].shape) n *= static_cast<uint64_t>(d);
    nbytes[i] = n;
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    int64_t ia = safetensors_itemsize(st_dtype[a]), ib = safetensors_itemsize(st_dtype[b]);
    if (ia != ib) return ia > ib;
    return entries[a].name < entries[b].name;
  });
  uint64_t offset = 0;
  for (size_t i : order) {
    begin[i] = offset;
    offset += nbytes[i];
  }

  // Header: "__metadata__" first, then tensors by name (HF's own header is also key-sorted).
  std::vector<size_t> by_name(order);
  std::sort(by_name.begin(), by_name.end(),
            [&](size_t a, size_t b) { return entries[a].name < entries[b].name; });
  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":" + nlohmann::json(metadata).dump();
    first = false;
  }
  for (size_t i : by_name) {
    if (!first) header += ",";
    first = false;
    header += nlohmann::json(entries[i].name).dump() + ":{\"dtype\":\"" + st_dtype[i] +
              "\",\"shape\":" + nlohmann::json(entries[i].shape).dump() + ",\"data_offsets\":[" +
              std::to_string(begin[i]) + "," + std::to_string(begin[i] + nbytes[i]) + "]}";
  }
  header += "}";
  while (header.size() % 8 != 0) header += ' ';

  atomic_write(path, [&](std::ostream& os) {
    uint64_t n = header.size();
    os.write(reinterpret_cast<const char*>(&n), 8);
    os.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (size_t i : order) {
      const auto& e = entries[i];
      torch::Tensor t = e.make();
      QTUNE_CHECK(t.defined(), "cannot write ", path, ": tensor \"", e.name, "\" is undefined");
      QTUNE_CHECK(t.scalar_type() == e.dtype, "cannot write ", path, ": tensor \"", e.name,
                  "\" has dtype ", c10::toString(t.scalar_type()), ", expected ",
                  c10::toString(e.dtype));
      QTUNE_CHECK(t.sizes().vec() == e.shape, "cannot write ", path, ": tensor \"", e.name,
                  "\" has shape ", shape_str(t.sizes().vec()), ", expected ", shape_str(e.shape));
      t = t.to(torch::kCPU).contiguous();
      os.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes[i]));
    }
  });
}

void write_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsEntry> entries;
  entries.reserve(tensors.size());
  for (const auto& kv : tensors) {
    QTUNE_CHECK(kv.second.defined(), "cannot write ", path, ": tensor \"", kv.first,
                "\" is undefined");
    const torch::Tensor t = kv.second;
    entries.push_back({kv.first, t.scalar_type(), t.sizes().vec(), [t] { return t; }});
  }
  write_safetensors(path, std::move(entries), metadata);
}

}  // namespace qtune
