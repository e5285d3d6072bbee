#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
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

TEST_CASE("random mutations of a valid file never crash") {
  auto p = temp_file("fuzz.safetensors");
  const std::string valid =
      hand_file(R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                R"("b":{"dtype":"I8","shape":[1,2],"data_offsets":[8,10]}})",
                floats({1, 2}) + std::string("\x01\x02", 2));
  std::mt19937 rng(1234);
  int accepted = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string blob = valid;
    const int edits = 1 + int(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      switch (rng() % 3) {
        case 0: blob[rng() % blob.size()] = char(rng()); break;
        case 1: blob.resize(rng() % (blob.size() + 1)); break;
        default: blob.insert(rng() % (blob.size() + 1), 1, char(rng())); break;
      }
      if (blob.empty()) break;
    }
    write_bytes(p, blob);
    try {
      auto f = SafetensorsFile::open(p.string());
      uint64_t total = 0;
      for (const auto& t : f->tensors()) total += t.nbytes();
      CHECK(8 + total <= f->file_size());
      ++accepted;
    } catch (const halo::FormatError&) {
    }
  }
  CHECK(accepted < 3000);
}
