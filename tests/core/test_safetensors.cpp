// safetensors: bit-exact round trips for every dtype, metadata, zero-copy reads, rejection of
// every malformed header with a message naming the tensor/key, and atomic replacement.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "qtune/atomic_file.h"
#include "qtune/error.h"
#include "qtune/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace qtune {
namespace {

using qtune::test::error_of;

// Random bit patterns of `dtype` (floats include NaNs, infinities, -0 and subnormals).
torch::Tensor random_bits(torch::ScalarType dtype, std::vector<int64_t> shape) {
  if (dtype == torch::kBool) return torch::randint(0, 2, shape).to(torch::kBool);
  const int64_t size = c10::elementSize(dtype);
  auto bits = size == 1   ? torch::kUInt8
              : size == 2 ? torch::kInt16
              : size == 4 ? torch::kInt32
                          : torch::kInt64;
  torch::Tensor t = size == 8
                        ? torch::randint(INT64_MIN, INT64_MAX, shape, torch::kInt64)
                        : torch::randint(-(int64_t(1) << (8 * size - 1)),
                                         (int64_t(1) << (8 * size - 1)) - 1, shape, torch::kInt64)
                              .to(bits);
  return t.view(dtype);
}

bool bit_equal(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  if (a.scalar_type() == torch::kBool) return torch::equal(a, b);
  const int64_t size = c10::elementSize(a.scalar_type());
  auto bits = size == 1   ? torch::kUInt8
              : size == 2 ? torch::kInt16
              : size == 4 ? torch::kInt32
                          : torch::kInt64;
  return torch::equal(a.contiguous().view(bits), b.contiguous().view(bits));
}

TEST(Safetensors, RoundTripEveryDtypeBitExact) {
  torch::manual_seed(7);
  const std::string path = test::temp_dir("st") + "/all.safetensors";
  std::map<std::string, torch::Tensor> tensors;
  const std::vector<std::pair<std::string, torch::ScalarType>> dtypes = {
      {"F64", torch::kFloat64},   {"F32", torch::kFloat32}, {"F16", torch::kFloat16},
      {"BF16", torch::kBFloat16}, {"I64", torch::kInt64},   {"I32", torch::kInt32},
      {"I16", torch::kInt16},     {"I8", torch::kInt8},     {"U8", torch::kUInt8},
      {"BOOL", torch::kBool}};
  for (const auto& [name, dt] : dtypes) tensors["t_" + name] = random_bits(dt, {3, 5, 7});
  tensors["scalar"] = torch::tensor(3.5, torch::kFloat32).reshape({});
  tensors["empty"] = torch::zeros({0, 4}, torch::kFloat16);
  tensors["transposed"] = torch::arange(12, torch::kFloat32).reshape({3, 4}).t();  // non-contiguous
  write_safetensors(path, tensors, {{"format", "pt"}, {"note", "h\u00e9llo \"quoted\""}});

  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->names().size(), tensors.size());
  for (const auto& [name, dt] : dtypes) {
    EXPECT_EQ(f->info("t_" + name).dtype, name);
    EXPECT_EQ(f->info("t_" + name).shape, (std::vector<int64_t>{3, 5, 7}));
    torch::Tensor back = f->tensor("t_" + name);
    EXPECT_EQ(back.scalar_type(), dt);
    EXPECT_TRUE(bit_equal(back, tensors["t_" + name])) << name;
    // every tensor is aligned to its element size
    EXPECT_EQ(reinterpret_cast<uintptr_t>(back.data_ptr()) % c10::elementSize(dt), 0u) << name;
  }
  EXPECT_EQ(f->tensor("scalar").dim(), 0);
  EXPECT_EQ(f->tensor("scalar").item<float>(), 3.5f);
  EXPECT_EQ(f->tensor("empty").sizes().vec(), (std::vector<int64_t>{0, 4}));
  EXPECT_TRUE(torch::equal(f->tensor("transposed"), tensors["transposed"]));
  EXPECT_EQ(f->metadata().at("format"), "pt");
  EXPECT_EQ(f->metadata().at("note"), "h\u00e9llo \"quoted\"");

  // The header is what HF writes: 8-aligned, space padded, __metadata__ first, keys sorted,
  // contiguous data covering the whole buffer.
  std::string bytes = test::read_file(path);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  std::string header = bytes.substr(8, n);
  EXPECT_EQ(header.rfind("{\"__metadata__\":", 0), 0u);
  auto j = nlohmann::json::parse(header);
  uint64_t total = 0;
  std::string prev;
  size_t last_pos = 0;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    total += it.value()["data_offsets"][1].get<uint64_t>() -
             it.value()["data_offsets"][0].get<uint64_t>();
    size_t pos = header.find("\"" + it.key() + "\":");
    EXPECT_GT(pos, last_pos) << "keys not sorted at " << it.key();
    last_pos = pos;
  }
  EXPECT_EQ(total, bytes.size() - 8 - n);
}

TEST(Safetensors, ZeroCopyAndMappingLifetime) {
  const std::string path = test::temp_dir("st") + "/z.safetensors";
  torch::Tensor w = torch::randn({16, 8});
  write_safetensors(path, {{"w", w}});
  auto f = SafetensorsFile::open(path);
  torch::Tensor a = f->tensor("w");
  torch::Tensor b = f->tensor("w");
  EXPECT_EQ(a.data_ptr(), static_cast<const void*>(f->raw("w")));  // views the mapping
  EXPECT_EQ(a.data_ptr(), b.data_ptr());
  f.reset();  // the tensors keep the mapping alive
  EXPECT_TRUE(torch::equal(a, w));
  torch::Tensor row = a[3];
  a = torch::Tensor();
  b = torch::Tensor();
  EXPECT_TRUE(torch::equal(row, w[3]));  // a view of a view still holds it
}

TEST(Safetensors, ReleasedPagesReadBackFromTheFile) {
  const std::string path = test::temp_dir("st") + "/r.safetensors";
  // Several pages each, at offsets that are not page-aligned (a 3-element tensor sits between).
  torch::Tensor big = torch::randn({3000, 7}), odd = torch::randn({3}), next = torch::randn({5000});
  write_safetensors(path, {{"a_big", big}, {"b_odd", odd}, {"c_next", next}});
  auto f = SafetensorsFile::open(path);
  torch::Tensor a = f->tensor("a_big"), b = f->tensor("b_odd"), c = f->tensor("c_next");
  ASSERT_TRUE(torch::equal(a, big) && torch::equal(c, next));  // pages now resident
  f->release("a_big");
  f->release("c_next");
  EXPECT_TRUE(torch::equal(a, big));
  EXPECT_TRUE(torch::equal(b, odd));
  EXPECT_TRUE(torch::equal(c, next));
  const std::string msg = error_of([&] { f->release("nope"); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("nope"), std::string::npos) << msg;
}

// ---- malformed files -------------------------------------------------------------------------

struct Malformed : ::testing::Test {
  std::string dir = test::temp_dir("stbad");
  int count = 0;
  // A file whose header is `header` (given length field unless `length` >= 0) then `buffer`.
  std::string make(const std::string& header, size_t buffer = 0, int64_t length = -1) {
    std::string path = dir + "/f" + std::to_string(count++) + ".safetensors";
    std::ofstream out(path, std::ios::binary);
    uint64_t n = length >= 0 ? static_cast<uint64_t>(length) : header.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << header << std::string(buffer, '\0');
    return path;
  }
  void expect(const std::string& path, const std::vector<std::string>& needles) {
    std::string msg = error_of([&] { SafetensorsFile::open(path); });
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    for (const auto& s : needles)
      EXPECT_NE(msg.find(s), std::string::npos) << "'" << s << "' not in: " << msg;
  }
};

TEST_F(Malformed, FileAndHeaderLength) {
  std::string p = dir + "/tiny.safetensors";
  { std::ofstream(p, std::ios::binary) << "abc"; }
  expect(p, {"3 bytes", "shorter than the 8-byte"});
  expect(make("{}", 0, 1000), {"header length 1000", "runs past the end", "10 bytes"});
  expect(make("{}", 0, int64_t(1) << 40), {"absurd"});
  expect(make("{\"a\": "), {"not valid JSON"});
  expect(make("[1, 2]"), {"must be a JSON object", "array"});
}

TEST_F(Malformed, Entries) {
  expect(make(R"({"a": 5})"), {"tensor \"a\"", "must be an object"});
  expect(make(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", 4),
         {"\"w\"", "\"dtype\" must be a string"});
  expect(make(R"({"w": {"dtype": "F24", "shape": [1], "data_offsets": [0, 4]}})", 4),
         {"\"w\"", "unknown dtype \"F24\"", "expected one of"});
  expect(make(R"({"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 4]}})", 4),
         {"\"w\"", "shape[1] must be a non-negative integer, got -1"});
  expect(make(R"({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 4]}})", 4),
         {"\"w\"", "shape[0] must be a non-negative integer, got 2.5"});
  expect(make(R"({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 4]}})", 4),
         {"\"w\"", "\"shape\" must be an array"});
  expect(make(R"({"w": {"dtype": "F32", "shape": [1]}})", 4), {"\"w\"", "data_offsets"});
  expect(make(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", 4),
         {"\"w\"", "[begin, end]"});
  expect(make(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", 4),
         {"\"w\"", "begin > end"});
  expect(make(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8),
         {"\"w\"", "hold 8 bytes", "needs 12 bytes"});
  expect(make(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8),
         {"\"w\"", "out of bounds", "8 bytes"});
  expect(make(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
              12),
         {"\"b\"", "overlap", "\"a\""});
  expect(make(R"({"__metadata__": {"k": 1}})"), {"__metadata__.k must be a string"});
  expect(make(R"({"__metadata__": [1]})"), {"\"__metadata__\" must be an object"});
}

TEST_F(Malformed, HolesAreAccepted) {
  // Gaps between tensors and trailing bytes are tolerated (documented in docs/formats.md).
  auto f =
      SafetensorsFile::open(make(R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
      "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}, "e": {"dtype": "F32", "shape": [0],
      "data_offsets": [2, 2]}})",
                                 16));
  EXPECT_EQ(f->names(), (std::vector<std::string>{"a", "b", "e"}));
  EXPECT_EQ(f->tensor("b").numel(), 4);
  EXPECT_NE(error_of([&] { f->tensor("nope"); }).find("\"nope\" not found"), std::string::npos);
}

// ---- atomic writes -------------------------------------------------------------------------

TEST(AtomicFile, FailedWriteLeavesOldFileAndNoTemp) {
  const std::string dir = test::temp_dir("atomic");
  const std::string path = dir + "/state.bin";
  atomic_write_string(path, "old contents");
  EXPECT_EQ(test::read_file(path), "old contents");

  EXPECT_THROW(atomic_write(path,
                            [](std::ostream& os) {
                              os << std::string(3 << 20, 'x');  // past the stream buffer
                              throw std::runtime_error("disk on fire");
                            }),
               std::runtime_error);
  EXPECT_EQ(test::read_file(path), "old contents");

  // Same through the safetensors writer: the second tensor's producer throws.
  const std::string st = dir + "/m.safetensors";
  write_safetensors(st, {{"a", torch::ones({4})}});
  std::vector<SafetensorsEntry> entries;
  entries.push_back({"a", torch::kFloat32, {1 << 20}, [] { return torch::zeros({1 << 20}); }});
  entries.push_back(
      {"b", torch::kFloat32, {2}, []() -> torch::Tensor { throw UserError("producer failed"); }});
  EXPECT_THROW(write_safetensors(st, entries), UserError);
  // A producer returning the wrong shape is an error naming the tensor.
  std::vector<SafetensorsEntry> wrong;
  wrong.push_back({"w", torch::kFloat32, {2, 3}, [] { return torch::zeros({3, 2}); }});
  EXPECT_NE(error_of([&] {
              write_safetensors(st, wrong);
            }).find("\"w\" has shape [3, 2], expected [2, 3]"),
            std::string::npos);
  auto f = SafetensorsFile::open(st);
  EXPECT_EQ(f->names(), (std::vector<std::string>{"a"}));
  EXPECT_TRUE(torch::equal(f->tensor("a"), torch::ones({4})));

  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    ++files;
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
  }
  EXPECT_EQ(files, 2u);

  // Replacing keeps the file's mode; a missing directory is a clear error.
  fs::permissions(path, fs::perms::owner_read | fs::perms::owner_write);
  atomic_write_string(path, "new");
  EXPECT_EQ(test::read_file(path), "new");
  EXPECT_EQ(fs::status(path).permissions() & fs::perms::all,
            fs::perms::owner_read | fs::perms::owner_write);
  EXPECT_NE(
      error_of([&] { atomic_write_string(dir + "/no/such/dir/x", "y"); }).find("does not exist"),
      std::string::npos);
}

}  // namespace
}  // namespace qtune
