// GGUF reader and writer: round trips through the writer, and every way a file
// can be broken giving a FormatError that names the file and the problem.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <string>
#include <vector>

#include "halo/core/error.hpp"
#include "halo/gguf/gguf.hpp"

using namespace halo::gguf;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir() {
  fs::path dir = fs::temp_directory_path() / ("halo-gguf-test-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir;
}

std::vector<uint8_t> read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

void write_all(const fs::path& p, const std::vector<uint8_t>& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

// A small valid file: three key/values and two tensors (F32 [4, 2] and Q8_0 [32]).
std::vector<KeyValue> sample_metadata() {
  const int32_t ints[3] = {1, -2, 3};
  return {{"general.architecture", Value::string("llama")},
          {"test.count", Value::u32(7)},
          {"test.list", Value::numeric_array(ValueType::i32, ints, 3)}};
}

fs::path write_sample(const fs::path& dir, const std::string& name = "sample.gguf") {
  const fs::path path = dir / name;
  GgufWriter w(path.string(), sample_metadata(), {{"a", {4, 2}, GgmlType::f32}, {"b", {32}, GgmlType::q8_0}});
  std::vector<float> a = {0, 1, 2, 3, 4, 5, 6, 7};
  std::vector<uint8_t> b(34, 1);
  w.write("a", a.data(), a.size() * 4);
  w.write("b", b.data(), b.size());
  w.finish();
  return path;
}

// Byte offset of the first tensor info (right after the key/values of the sample).
size_t tensor_infos_offset() { return serialize_header(sample_metadata(), {}, 1).size(); }

template <typename T>
void poke(std::vector<uint8_t>& bytes, size_t offset, T value) {
  std::memcpy(bytes.data() + offset, &value, sizeof(T));
}

std::string open_error(const fs::path& p) {
  try {
    GgufFile::open(p.string());
  } catch (const halo::FormatError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("writer output reads back: metadata, shapes, types, offsets, data", "[gguf]") {
  const fs::path dir = temp_dir();
  const fs::path path = write_sample(dir);
  auto f = GgufFile::open(path.string());
  CHECK(f->version() == 3);
  REQUIRE(f->metadata().size() == 3);
  CHECK(f->metadata()[0].key == "general.architecture");
  CHECK(f->find("general.architecture")->as_string() == "llama");
  CHECK(f->find("test.count")->as_u64() == 7);
  const Value* list = f->find("test.list");
  REQUIRE(list->is_array());
  CHECK(list->element_type == ValueType::i32);
  CHECK(list->count == 3);
  int32_t got[3];
  std::memcpy(got, list->bytes.data(), 12);
  CHECK(got[1] == -2);
  REQUIRE(f->tensors().size() == 2);
  const TensorInfo& a = f->tensor("a");
  CHECK(a.dims == std::vector<int64_t>{4, 2});
  CHECK(a.offset == 0);
  CHECK(a.nbytes == 32);
  const TensorInfo& b = f->tensor("b");
  CHECK(b.type == GgmlType::q8_0);
  CHECK(b.offset == 32);  // 32 bytes of a, already aligned
  CHECK(f->data_offset() % 32 == 0);
  const float* values = reinterpret_cast<const float*>(f->data(a));
  CHECK(values[7] == 7.0f);
  std::vector<float> deq(32);
  f->to_float(b, deq.data());
  CHECK(f->file_size() == f->data_offset() + 32 + 64);  // b padded to 64 bytes
  fs::remove_all(dir);
}

TEST_CASE("writer: streamed parts, bad order and sizes, unfinished files leave nothing", "[gguf]") {
  const fs::path dir = temp_dir();
  const fs::path path = dir / "parts.gguf";
  {
    GgufWriter w(path.string(), {}, {{"t", {64}, GgmlType::f32}});
    std::vector<float> data(64, 1.5f);
    w.write("t", data.data(), 100);  // parts of one tensor, in order
    CHECK(w.written() == 0);
    CHECK_THROWS_WITH(w.write("t", data.data() + 25, 200), Catch::Contains("too many"));
  }
  CHECK_FALSE(fs::exists(path));
  for (const auto& entry : fs::directory_iterator(dir)) FAIL("left behind: " << entry.path());
  {
    GgufWriter w(path.string(), {}, {{"x", {32}, GgmlType::f32}, {"y", {32}, GgmlType::f32}});
    std::vector<float> data(32);
    CHECK_THROWS_WITH(w.write("y", data.data(), 128), Catch::Contains("expected tensor 'x'"));
    w.write("x", data.data(), 128);
    CHECK_THROWS_WITH(w.finish(), Catch::Contains("only 1 of 2"));
  }
  CHECK_FALSE(fs::exists(path));
  CHECK_THROWS_WITH(GgufWriter((dir / "n.gguf").string(), {}, {{std::string(64, 'n'), {32}, GgmlType::f32}}),
                    Catch::Contains("1 to 63 bytes"));
  CHECK_THROWS_WITH(GgufWriter((dir / "n.gguf").string(), {}, {{"q", {33}, GgmlType::q4_0}}),
                    Catch::Contains("block size 32"));
  CHECK_THROWS_WITH(GgufWriter((dir / "n.gguf").string(), {}, {{"d", {}, GgmlType::f32}}),
                    Catch::Contains("1 to 4"));
  CHECK_THROWS_WITH(GgufWriter((dir / "n.gguf").string(), {{"k", Value::u32(1)}, {"k", Value::u32(2)}}, {}),
                    Catch::Contains("duplicate metadata key"));
  CHECK_THROWS_WITH(GgufWriter((dir / "n.gguf").string(), {}, {}, 48), Catch::Contains("power of two"));
  CHECK_THROWS_WITH(GgufWriter((dir / "n.gguf").string(), {}, {}, 64), Catch::Contains("general.alignment"));
  fs::remove_all(dir);
}

TEST_CASE("alignment from general.alignment is honoured by writer and reader", "[gguf]") {
  const fs::path dir = temp_dir();
  const fs::path path = dir / "a64.gguf";
  GgufWriter w(path.string(), {{"general.alignment", Value::u32(64)}},
               {{"x", {8}, GgmlType::f32}, {"y", {8}, GgmlType::f32}}, 64);
  std::vector<float> data(8, 2.0f);
  w.write("x", data.data(), 32);
  w.write("y", data.data(), 32);
  w.finish();
  auto f = GgufFile::open(path.string());
  CHECK(f->alignment() == 64);
  CHECK(f->data_offset() % 64 == 0);
  CHECK(f->tensor("y").offset == 64);
  fs::remove_all(dir);
}

TEST_CASE("every truncation of a valid file is a FormatError naming the file", "[gguf]") {
  const fs::path dir = temp_dir();
  const fs::path sample = write_sample(dir);
  const std::vector<uint8_t> bytes = read_all(sample);
  // The last tensor's bytes end before the final padding; cutting only padding is harmless.
  const uint64_t needed = GgufFile::open(sample.string())->data_offset() + 32 + 34;
  const fs::path cut = dir / "cut.gguf";
  for (size_t n = 0; n < bytes.size(); ++n) {
    write_all(cut, std::vector<uint8_t>(bytes.begin(), bytes.begin() + long(n)));
    const std::string err = open_error(cut);
    INFO("truncated to " << n << " bytes");
    if (n < needed)
      CHECK_THAT(err, Catch::Contains(cut.string()));
    else
      CHECK(err.empty());
  }
  fs::remove_all(dir);
}

TEST_CASE("corrupt headers give clear errors", "[gguf]") {
  const fs::path dir = temp_dir();
  const std::vector<uint8_t> good = read_all(write_sample(dir));
  const fs::path p = dir / "bad.gguf";
  const size_t kv0 = 24;                              // first key/value
  const size_t key0_len = 8 + std::strlen("general.architecture");
  const size_t kv0_type = kv0 + key0_len;             // u32 type of the first value
  const size_t infos = tensor_infos_offset();     // first tensor info
  const size_t name_a = infos + 8 + 1;                // after "a"
  const size_t dims_a = name_a + 4;                   // ne[0] of a
  const size_t type_a = dims_a + 16;                  // after ne[0], ne[1]
  const size_t offset_a = type_a + 4;

  struct Case {
    const char* what;
    std::function<void(std::vector<uint8_t>&)> edit;
    const char* message;
  };
  const Case cases[] = {
      {"magic", [](auto& b) { b[0] = 'X'; }, "not 'GGUF'"},
      {"version 1", [](auto& b) { poke<uint32_t>(b, 4, 1); }, "version 1 is obsolete"},
      {"version 7", [](auto& b) { poke<uint32_t>(b, 4, 7); }, "unsupported GGUF version 7"},
      {"big-endian", [](auto& b) { poke<uint32_t>(b, 4, 0x03000000u); }, "big-endian"},
      {"huge tensor count", [](auto& b) { poke<uint64_t>(b, 8, uint64_t(1) << 60); }, "tensor count"},
      {"huge kv count", [](auto& b) { poke<uint64_t>(b, 16, uint64_t(1) << 62); }, "key/value count"},
      {"huge key length", [&](auto& b) { poke<uint64_t>(b, kv0, uint64_t(1) << 40); }, "has length"},
      {"bad value type", [&](auto& b) { poke<uint32_t>(b, kv0_type, 13); }, "unknown value type 13"},
      {"huge string", [&](auto& b) { poke<uint64_t>(b, kv0_type + 4, ~uint64_t(0)); }, "has length"},
      {"zero dims", [&](auto& b) { poke<uint32_t>(b, name_a, 0); }, "0 dimensions"},
      {"five dims", [&](auto& b) { poke<uint32_t>(b, name_a, 5); }, "5 dimensions"},
      {"negative dim", [&](auto& b) { poke<int64_t>(b, dims_a, -4); }, "negative"},
      {"overflowing dims", [&](auto& b) {
         poke<int64_t>(b, dims_a, int64_t(1) << 40);
         poke<int64_t>(b, dims_a + 8, int64_t(1) << 40);
       }, "64 bits"},
      {"unknown type", [&](auto& b) { poke<uint32_t>(b, type_a, 31); }, "unknown ggml type 31"},
      {"row not whole blocks", [&](auto& b) { poke<uint32_t>(b, type_a, 8); }, "not a multiple of the block size"},
      {"misaligned offset", [&](auto& b) { poke<uint64_t>(b, offset_a, 4); }, "not a multiple of the alignment"},
      {"offset past the end", [&](auto& b) { poke<uint64_t>(b, offset_a, uint64_t(1) << 40); }, "truncated or the offset"},
      {"overlap", [&](auto& b) { poke<uint64_t>(b, offset_a, 32); }, "overlaps"},
  };
  for (const Case& c : cases) {
    std::vector<uint8_t> bytes = good;
    c.edit(bytes);
    write_all(p, bytes);
    const std::string err = open_error(p);
    INFO(c.what << ": " << err);
    CHECK_THAT(err, Catch::Contains(p.string()));
    CHECK_THAT(err, Catch::Contains(c.message));
  }
  fs::remove_all(dir);
}

TEST_CASE("metadata checks: bools, nested arrays, duplicate names, alignment key", "[gguf]") {
  const fs::path dir = temp_dir();
  const fs::path p = dir / "m.gguf";
  auto build = [&](const std::vector<uint8_t>& kv_bytes, uint64_t n_kv, const std::vector<uint8_t>& tail = {}) {
    std::vector<uint8_t> b = {'G', 'G', 'U', 'F', 3, 0, 0, 0};
    const uint64_t n_tensors = tail.empty() ? 0 : 2;
    for (int i = 0; i < 8; ++i) b.push_back(uint8_t(n_tensors >> (8 * i)));
    for (int i = 0; i < 8; ++i) b.push_back(uint8_t(n_kv >> (8 * i)));
    b.insert(b.end(), kv_bytes.begin(), kv_bytes.end());
    b.insert(b.end(), tail.begin(), tail.end());
    b.resize(b.size() + 256, 0);
    write_all(p, b);
  };
  auto key = [](const std::string& k, uint32_t type) {
    std::vector<uint8_t> b;
    const uint64_t n = k.size();
    for (int i = 0; i < 8; ++i) b.push_back(uint8_t(n >> (8 * i)));
    b.insert(b.end(), k.begin(), k.end());
    for (int i = 0; i < 4; ++i) b.push_back(uint8_t(type >> (8 * i)));
    return b;
  };
  auto kv = key("flag", 7);
  kv.push_back(2);
  build(kv, 1);
  CHECK_THAT(open_error(p), Catch::Contains("bool with byte value 2"));

  kv = key("nested", 9);
  for (uint8_t byte : {9, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0}) kv.push_back(byte);
  build(kv, 1);
  CHECK_THAT(open_error(p), Catch::Contains("array of arrays"));

  kv = key("general.alignment", 10);
  for (int i = 0; i < 8; ++i) kv.push_back(i == 0 ? 32 : 0);
  build(kv, 1);
  CHECK_THAT(open_error(p), Catch::Contains("must be uint32"));

  kv = key("general.alignment", 4);
  for (uint8_t byte : {24, 0, 0, 0}) kv.push_back(byte);
  build(kv, 1);
  CHECK_THAT(open_error(p), Catch::Contains("not a power of two"));

  kv = key("k", 4);
  for (uint8_t byte : {1, 0, 0, 0}) kv.push_back(byte);
  {
    auto second = key("k", 4);
    for (uint8_t byte : {2, 0, 0, 0}) second.push_back(byte);
    kv.insert(kv.end(), second.begin(), second.end());
  }
  build(kv, 2);
  CHECK_THAT(open_error(p), Catch::Contains("duplicate key 'k'"));

  kv = key("", 4);
  for (uint8_t byte : {1, 0, 0, 0}) kv.push_back(byte);
  build(kv, 1);
  CHECK_THAT(open_error(p), Catch::Contains("empty key"));

  // Two tensors named "t".
  std::vector<uint8_t> infos;
  for (int t = 0; t < 2; ++t) {
    for (int byte : {1, 0, 0, 0, 0, 0, 0, 0, int('t')}) infos.push_back(uint8_t(byte));
    for (uint8_t byte : {1, 0, 0, 0}) infos.push_back(byte);
    for (uint8_t byte : {4, 0, 0, 0, 0, 0, 0, 0}) infos.push_back(byte);
    for (uint8_t byte : {0, 0, 0, 0}) infos.push_back(byte);
    for (int i = 0; i < 8; ++i) infos.push_back(t == 0 ? 0 : (i == 0 ? 32 : 0));
  }
  build({}, 0, infos);
  CHECK_THAT(open_error(p), Catch::Contains("duplicate tensor 't'"));
  fs::remove_all(dir);
}

TEST_CASE("files that are not regular files or are too short", "[gguf]") {
  const fs::path dir = temp_dir();
  CHECK_THAT(open_error(dir), Catch::Contains("not a regular file"));
  CHECK_THAT(open_error(dir / "missing.gguf"), Catch::Contains("cannot open"));
  write_all(dir / "short.gguf", {'G', 'G', 'U', 'F'});
  CHECK_THAT(open_error(dir / "short.gguf"), Catch::Contains("fewer than a GGUF header"));
  fs::remove_all(dir);
}
