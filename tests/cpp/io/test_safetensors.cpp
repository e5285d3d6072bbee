#include <catch2/catch.hpp>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdint>
#include <future>
#include <iterator>
#include <limits>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "halo/core/error.hpp"
#include "halo/io/safetensors.hpp"

namespace fs = std::filesystem;
using namespace halo::io;

namespace {

fs::path temp_file(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / ("halo-io-test-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir / name;
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
}

// A file assembled by hand (independent of the writer): length prefix, JSON, data.
std::string hand_file(const std::string& json, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int k = 0; k < 8; ++k) out[size_t(k)] = char((n >> (8 * k)) & 0xFF);
  return out + json + data;
}

std::string floats(std::initializer_list<float> v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(s.data(), std::data(v), s.size());
  return s;
}

}  // namespace

TEST_CASE("reads a hand-made file zero-copy") {
  auto p = temp_file("hand.safetensors");
  write_bytes(p, hand_file(R"({"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},)"
                           R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                           floats({1.5f, -2.0f, 7.0f})));
  auto f = SafetensorsFile::open(p.string());
  REQUIRE(f->tensors().size() == 2);
  CHECK(f->tensors()[0].name == "a");  // offset order
  CHECK(f->metadata().at("format") == "pt");
  const auto& b = f->info("b");
  float v;
  std::memcpy(&v, f->data(b), 4);
  CHECK(v == 7.0f);
  CHECK(b.shape == std::vector<int64_t>{1});
  CHECK_THROWS_AS(f->info("zzz"), halo::InvalidArgument);
}

TEST_CASE("writer output reads back byte for byte") {
  auto p = temp_file("w.safetensors");
  std::vector<float> a{1, 2, 3, 4, 5, 6};
  std::vector<uint16_t> b{0x3F80, 0xC000};
  {
    SafetensorsWriter w(p.string(), {{"a", halo::Format::f32, {2, 3}}, {"b", halo::Format::bf16, {2}}, {"e", halo::Format::f32, {0}}},
                        {{"format", "pt"}, {"q\"uote", "x\ny"}});
    w.write("a", a.data(), a.size() * 4);
    w.write("b", b.data(), b.size() * 2);
    w.write("e", nullptr, 0);
    w.finish();
  }
  auto f = SafetensorsFile::open(p.string());
  CHECK(f->metadata().at("q\"uote") == "x\ny");
  CHECK(std::memcmp(f->data(f->info("a")), a.data(), 24) == 0);
  CHECK(std::memcmp(f->data(f->info("b")), b.data(), 4) == 0);
  CHECK(f->info("e").nbytes() == 0);
  // The JSON header is padded to 8 bytes, as the reference writer does.
  uint64_t n = 0;
  std::ifstream(p, std::ios::binary).read(reinterpret_cast<char*>(&n), 8);
  CHECK(n % 8 == 0);
}

TEST_CASE("unfinished writer leaves nothing behind") {
  auto p = temp_file("unfinished.safetensors");
  {
    SafetensorsWriter w(p.string(), {{"a", halo::Format::f32, {1}}}, {});
    CHECK_THROWS_AS(w.write("b", nullptr, 4), halo::InvalidArgument);
  }
  CHECK_FALSE(fs::exists(p));
  for (const auto& e : fs::directory_iterator(p.parent_path()))
    CHECK(e.path().filename().string().find("unfinished") == std::string::npos);
}

TEST_CASE("bad headers raise FormatError naming the problem") {
  const std::string data = floats({1, 2});
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", "need"},
      {R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", "unknown dtype"},
      {R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", "non-negative integer"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
       "overlaps"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", "belong to no tensor"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"k":[1]}})", "not a string"},
      {R"({"a":{"dtype":"F32","shape":[99999999999,99999999999,99999999999],"data_offsets":[0,8]}})", "overflows"},
      {R"({"a":)", "not valid JSON"},
      {"\xff", "not valid JSON"},
  };
  for (const auto& [json, message] : cases) {
    auto p = temp_file("bad.safetensors");
    write_bytes(p, hand_file(json, data));
    INFO(json);
    try {
      SafetensorsFile::open(p.string());
      FAIL("accepted");
    } catch (const halo::FormatError& e) {
      CHECK_THAT(e.what(), Catch::Contains(message) && Catch::Contains(p.string()));
    }
  }
}

// Mutated files: the fuzz target tests/fuzz/target_safetensors.cpp (ctest fuzz:safetensors, `make fuzz`).

// -- hostile paths, file types and shapes ---------------------------------------------------------

namespace {

std::string open_error(const std::string& path, halo::io::LoadMode mode = halo::io::LoadMode::map) {
  try {
    SafetensorsFile::open(path, mode);
  } catch (const halo::FormatError& e) {
    return e.what();
  }
  return "accepted";
}

bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k)
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    i += len;
  }
  return true;
}

}  // namespace

TEST_CASE("a FIFO is refused without blocking, and so are directories and devices") {
  auto fifo = temp_file("pipe.safetensors");
  fs::remove(fifo);
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  // Run the open on another thread: if it blocked (no writer ever comes), release it by
  // opening the FIFO for writing, and fail.
  auto pending = std::async(std::launch::async, [&] { return open_error(fifo.string()); });
  if (pending.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    const int fd = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
    pending.wait();
    if (fd >= 0) ::close(fd);
    FAIL("open_safetensors blocked on a FIFO");
  }
  const std::string message = pending.get();
  CHECK_THAT(message, Catch::Contains("FIFO") && Catch::Contains(fifo.string()));
  CHECK_THAT(open_error(fifo.string(), halo::io::LoadMode::copy), Catch::Contains("FIFO"));
  fs::remove(fifo);
  CHECK_THAT(open_error(fifo.parent_path().string()), Catch::Contains("a directory"));
  CHECK_THAT(open_error("/dev/zero"), Catch::Contains("character device"));
  CHECK_THAT(open_error("/dev/null", halo::io::LoadMode::copy), Catch::Contains("character device"));
}

TEST_CASE("paths with a NUL byte are refused by the reader and the writer") {
  auto real = temp_file("nul-target");
  fs::remove(real);
  const std::string with_nul = real.string() + std::string("\0.safetensors", 13);
  CHECK_THAT(open_error(with_nul), Catch::Contains("NUL byte"));
  CHECK_THROWS_WITH(SafetensorsWriter(with_nul, {{"a", halo::Format::f32, {1}}}, {}), Catch::Contains("NUL byte"));
  CHECK_FALSE(fs::exists(real));
  for (const auto& e : fs::directory_iterator(real.parent_path()))
    CHECK(e.path().filename().string().find("nul-target") == std::string::npos);
}

TEST_CASE("shapes NumPy and torch cannot hold are refused by the reader, naming the file") {
  const std::string dims65 = [] {
    std::string s = "[";
    for (int k = 0; k < 65; ++k) s += k ? ",1" : "1";
    return s + "]";
  }();
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"a":{"dtype":"F32","shape":)" + dims65 + R"(,"data_offsets":[0,4]}})", "65 dimensions"},
      {R"({"a":{"dtype":"F32","shape":[0,4611686018427387904],"data_offsets":[0,0]}})", "overflows"},
      {R"({"a":{"dtype":"U8","shape":[9223372036854775807,0,2],"data_offsets":[0,0]}})", "overflows"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
       "duplicate key"},
      {R"({"__metadata__":)" + std::string(100, '[') + std::string(100, ']') + "}", "nested deeper"},
      {"{\"\xc0\xae\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", "not valid JSON"},
      {"{\"\xed\xa0\x80\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", "not valid JSON"},
      {R"({"a":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}})", "non-negative integer"},
      {R"({"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,4]}})", "non-negative integer"},
      {R"({"a":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,4]}})", "non-negative integer"},
  };
  for (const auto& [json, message] : cases) {
    auto p = temp_file("shape.safetensors");
    write_bytes(p, hand_file(json, floats({1})));
    INFO(json.substr(0, 120));
    const std::string error = open_error(p.string());
    CHECK_THAT(error, Catch::Contains(message) && Catch::Contains(p.string()));
    CHECK(valid_utf8(error));
  }
  // 64 dimensions is the limit, and is accepted.
  std::string dims64 = "[";
  for (int k = 0; k < 64; ++k) dims64 += k ? ",1" : "1";
  auto p = temp_file("dims64.safetensors");
  write_bytes(p, hand_file(R"({"a":{"dtype":"F32","shape":)" + dims64 + R"(],"data_offsets":[0,4]}})", floats({1})));
  CHECK(SafetensorsFile::open(p.string())->info("a").shape.size() == 64);
}

TEST_CASE("error messages stay valid UTF-8 when a long name is cut") {
  std::string name;
  for (int k = 0; k < 60; ++k) name += "\xc3\xa9";  // 'e' with acute accent, 2 bytes each
  auto p = temp_file("utf8.safetensors");
  write_bytes(p, hand_file("{\"" + name + R"(":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}})", floats({1})));
  const std::string error = open_error(p.string());
  CHECK_THAT(error, Catch::Contains("unknown dtype"));
  CHECK(valid_utf8(error));
}

TEST_CASE("the writer refuses what the reader would refuse, before creating the file") {
  auto p = temp_file("refused.safetensors");
  fs::remove(p);
  const std::vector<std::vector<TensorSpec>> bad = {
      {{"a", halo::Format::f32, {int64_t(1) << 62, 4}}},                             // byte size overflows
      {{"a", halo::Format::u8, {0, std::numeric_limits<int64_t>::max(), 2}}},         // strides overflow
      {{"a", halo::Format::f32, std::vector<int64_t>(65, 1)}},                       // too many dimensions
      {{"a", halo::Format::f32, {-1}}},                                              // negative
      {{"a", halo::Format::u8, {int64_t(1) << 62}}, {"b", halo::Format::u8, {int64_t(1) << 62}}},  // total overflows
      {{"bad\xff", halo::Format::f32, {1}}},                                         // invalid UTF-8 name
  };
  for (const auto& specs : bad) {
    CHECK_THROWS_AS(SafetensorsWriter(p.string(), specs, {}), halo::InvalidArgument);
    CHECK_FALSE(fs::exists(p));
  }
  CHECK_THROWS_AS(SafetensorsWriter(p.string(), {}, {{"k", "\xc0\x80"}}), halo::InvalidArgument);
  for (const auto& e : fs::directory_iterator(p.parent_path()))
    CHECK(e.path().filename().string().find("refused") == std::string::npos);
}

TEST_CASE("durable and non-durable writers produce the same bytes") {
  std::vector<float> a{1, 2, 3};
  std::string bytes[2];
  for (int durable = 0; durable < 2; ++durable) {
    auto p = temp_file("durable" + std::to_string(durable) + ".safetensors");
    SafetensorsWriter w(p.string(), {{"a", halo::Format::f32, {3}}}, {{"format", "pt"}}, durable == 1);
    w.write("a", a.data(), 12);
    w.finish();
    std::ifstream in(p, std::ios::binary);
    bytes[durable].assign(std::istreambuf_iterator<char>(in), {});
  }
  CHECK(bytes[0] == bytes[1]);
  CHECK(bytes[0].size() > 12);
}

TEST_CASE("truncating a mapped file raises SIGBUS on access, a copied file is immune") {
  auto p = temp_file("trunc.safetensors");
  std::vector<float> big(1 << 16, 1.5f);  // 256 KiB: several pages
  {
    SafetensorsWriter w(p.string(), {{"a", halo::Format::f32, {int64_t(big.size())}}}, {}, false);
    w.write("a", big.data(), big.size() * 4);
    w.finish();
  }
  auto copied = SafetensorsFile::open(p.string(), halo::io::LoadMode::copy);
  CHECK(copied->copied());
  // The documented hazard, shown in a child process so the test itself survives it.
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    std::signal(SIGBUS, SIG_DFL);  // the default action, also under ASan (which would report it)
    auto mapped = SafetensorsFile::open(p.string());
    if (::truncate(p.c_str(), 4096) != 0) ::_exit(3);
    volatile float sink = 0;
    const auto* data = reinterpret_cast<const float*>(mapped->data(mapped->info("a")));
    for (size_t i = 0; i < big.size(); i += 1024) sink = sink + data[i];
    ::_exit(0);  // reached only if no SIGBUS
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFSIGNALED(status));
  if (WIFSIGNALED(status)) CHECK(WTERMSIG(status) == SIGBUS);
  copied->release_pages();  // a no-op on the copy: its data must survive
  const auto* data = reinterpret_cast<const float*>(copied->data(copied->info("a")));
  float sum = 0;
  for (size_t i = 0; i < big.size(); ++i) sum += data[i];
  CHECK(sum == 1.5f * float(big.size()));
}
