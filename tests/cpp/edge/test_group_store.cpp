#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "halo/core/error.hpp"
#include "halo/edge/group_store.hpp"
#include "halo/quant/quant4.hpp"

using namespace halo;
using namespace halo::edge;

namespace {

std::string temp_path(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("halo-group-store-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

struct Tensor {
  TensorSpec spec;
  Quantized4 q;
  std::vector<float> values;
};

// A store of `layers` x 2 parts x `per_part` groups, each with a 4-bit [rows, cols] "w" and
// an f32 bias "b" of `rows`; returns the tensors written, in layout order.
std::vector<std::vector<Tensor>> write_store(const std::string& path, int layers, int per_part, int rows, int cols,
                                             uint32_t seed = 1) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<GroupSpec> layout;
  std::vector<std::vector<Tensor>> data;
  for (int l = 0; l < layers; ++l)
    for (int p = 0; p < 2; ++p)
      for (int i = 0; i < per_part; ++i) {
        GroupSpec g{{l, p, i}, {}};
        std::vector<Tensor> ts(2);
        ts[0].spec = {"w", Format::nf4, 64, rows, cols};
        std::vector<float> w(size_t(rows) * cols);
        for (auto& v : w) v = normal(rng);
        ts[0].q = quantize_4bit(w.data(), Format::f32, {rows, cols}, Format::nf4, 64);
        ts[1].spec = {"b", Format::f32, 0, 1, rows};
        ts[1].values.resize(size_t(rows));
        for (auto& v : ts[1].values) v = normal(rng);
        g.tensors = {ts[0].spec, ts[1].spec};
        layout.push_back(g);
        data.push_back(std::move(ts));
      }
  GroupStoreWriter writer(path, R"({"test": true})", layout);
  for (size_t i = 0; i < layout.size(); ++i) {
    auto& ts = data[i];
    TensorData w, b;
    w.packed = ts[0].q.packed.data();
    w.packed_bytes = int64_t(ts[0].q.packed.size());
    w.absmax = ts[0].q.absmax.data();
    w.absmax_count = int64_t(ts[0].q.absmax.size());
    b.values = ts[1].values.data();
    b.values_count = int64_t(ts[1].values.size());
    writer.write_group(layout[i].key, {w, b});
  }
  writer.finish();
  return data;
}

StoreOptions options(uint64_t budget, bool prefetch = false) {
  StoreOptions o;
  o.budget_bytes = budget;
  o.prefetch = prefetch;
  o.drop_page_cache = false;
  return o;
}

void flip_byte(const std::string& path, uint64_t offset) {
  const int fd = ::open(path.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  uint8_t b = 0;
  REQUIRE(::pread(fd, &b, 1, off_t(offset)) == 1);
  b ^= 0x5A;
  REQUIRE(::pwrite(fd, &b, 1, off_t(offset)) == 1);
  ::close(fd);
}

}  // namespace

TEST_CASE("group store returns exactly the bytes written") {
  const std::string path = temp_path("exact.halogrp");
  const auto data = write_store(path, 3, 2, 17, 96);  // 17 x 96: an odd row count, blocks across rows
  StoreOptions o = options(UINT64_MAX);
  o.drop_page_cache = GENERATE(false, true);  // buffered reads, or O_DIRECT (buffered + DONTNEED on tmpfs)
  GroupStore store(path, o);
  REQUIRE(store.groups().size() == 12);
  REQUIRE(store.meta() == R"({"test":true})");
  REQUIRE(store.exchanges() == 6);
  for (size_t i = 0; i < data.size(); ++i) {
    const GroupKey key = store.groups()[i].key;
    REQUIRE(store.load_now(key));
    const auto bytes = store.tensor_bytes(key, "w");
    const auto& q = data[i][0].q;
    REQUIRE(std::memcmp(bytes.data(), q.packed.data(), q.packed.size()) == 0);
    const uint64_t absmax_at = store.groups()[i].find("w")->absmax_offset();
    REQUIRE(std::memcmp(bytes.data() + absmax_at, q.absmax.data(), q.absmax.size() * 4) == 0);
    std::vector<float> w(17 * 96), expect(17 * 96), bias(17);
    store.read_tensor(key, "w", w.data());
    dequantize_4bit(q, expect.data(), Format::f32, Backend::scalar);
    REQUIRE(std::memcmp(w.data(), expect.data(), w.size() * 4) == 0);
    store.read_tensor(key, "b", bias.data());
    REQUIRE(std::memcmp(bias.data(), data[i][1].values.data(), bias.size() * 4) == 0);
    store.release({key});
  }
  REQUIRE(store.errors().empty());
}

TEST_CASE("linear_4bit matches the dequantized matrix product on every backend") {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (const auto shape : {std::array<int64_t, 3>{1, 1, 64}, {3, 5, 33}, {1, 31, 576}, {7, 65, 130}, {2, 12, 4097}}) {
    const int64_t rows = shape[0], out = shape[1], in = shape[2];
    std::vector<float> w(size_t(out * in)), x(size_t(rows * in));
    for (auto& v : w) v = normal(rng);
    for (auto& v : x) v = normal(rng);
    const Quantized4 q = quantize_4bit(w.data(), Format::f32, {out, in}, Format::nf4, 64);
    std::vector<float> deq(w.size());
    dequantize_4bit(q, deq.data(), Format::f32, Backend::scalar);
    std::vector<float> reference(size_t(rows * out));
    linear_4bit(x.data(), rows, in, q.packed.data(), q.absmax.data(), Format::nf4, 64, out, reference.data(),
                Backend::scalar);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < out; ++o) {
        double exact = 0;
        for (int64_t i = 0; i < in; ++i) exact += double(x[size_t(r * in + i)]) * deq[size_t(o * in + i)];
        REQUIRE(reference[size_t(r * out + o)] == Approx(exact).margin(1e-4 * std::sqrt(double(in))));
      }
    for (Backend b : available_backends()) {
      if (b == Backend::cuda) continue;
      std::vector<float> y(reference.size());
      linear_4bit(x.data(), rows, in, q.packed.data(), q.absmax.data(), Format::nf4, 64, out, y.data(), b);
      for (size_t i = 0; i < y.size(); ++i) REQUIRE(y[i] == Approx(reference[i]).margin(1e-4 * std::sqrt(double(in))));
    }
  }
}

TEST_CASE("the resident bytes never exceed the budget, and eviction follows importance") {
  const std::string path = temp_path("budget.halogrp");
  write_store(path, 1, 4, 64, 128);  // 8 groups of 4864 bytes (two pages each)
  GroupStore probe(path, options(UINT64_MAX));
  const uint64_t group = probe.group_pages_bytes({0, 0, 0});
  GroupStore store(path, options(3 * group));
  const std::vector<GroupKey> keys = {{0, 0, 0}, {0, 0, 1}, {0, 0, 2}, {0, 0, 3}};
  store.set_importance(keys, {0.3, 0.9, 0.1, 0.5});
  for (int i = 0; i < 3; ++i) {
    REQUIRE(store.load_now(keys[size_t(i)]));
    store.release({keys[size_t(i)]});
  }
  REQUIRE(store.stats().resident_bytes == 3 * group);
  // Loading the fourth must evict the least important resident one (0.1), not the oldest (0.3).
  REQUIRE(store.load_now(keys[3]));
  store.release({keys[3]});
  auto resident = store.resident();
  REQUIRE(resident == std::vector<GroupKey>{{0, 0, 0}, {0, 0, 1}, {0, 0, 3}});
  // New importance: now group 1 is the least important and goes next.
  store.set_importance(keys, {0.3, 0.05, 0.1, 0.5});
  REQUIRE(store.load_now(keys[2]));
  store.release({keys[2]});
  resident = store.resident();
  REQUIRE(resident == std::vector<GroupKey>{{0, 0, 0}, {0, 0, 2}, {0, 0, 3}});
  REQUIRE(store.stats().peak_resident_bytes <= 3 * group);
  // Groups in use are never evicted: with all three acquired a fourth cannot come in.
  REQUIRE(store.acquire(resident) == std::vector<uint8_t>{1, 1, 1});
  REQUIRE_FALSE(store.load_now(keys[1]));
  store.release(resident);
  REQUIRE(store.stats().resident_bytes <= 3 * group);
}

TEST_CASE("a smaller budget evicts down to it: pinned groups bound how small it may get") {
  const std::string path = temp_path("set_budget.halogrp");
  write_store(path, 1, 4, 64, 128);
  GroupStore probe(path, options(UINT64_MAX));
  const uint64_t group = probe.group_pages_bytes({0, 0, 0});
  GroupStore store(path, options(8 * group));
  REQUIRE(store.pin({{0, 1, 3}}).empty());
  for (const auto& g : store.groups()) {
    REQUIRE(store.load_now(g.key));
    store.release({g.key});
  }
  REQUIRE(store.stats().resident_bytes == 8 * group);
  store.set_budget(3 * group);
  REQUIRE(store.budget() == 3 * group);
  REQUIRE(store.stats().resident_bytes <= 3 * group);
  const auto resident = store.resident();
  REQUIRE(std::find(resident.begin(), resident.end(), GroupKey{0, 1, 3}) != resident.end());
  REQUIRE_THROWS_WITH(store.set_budget(group / 2), Catch::Contains("cannot hold"));
  StoreOptions bad = options(8 * group);
  bad.read_bandwidth = -1;
  REQUIRE_THROWS_WITH(GroupStore(path, bad), Catch::Contains("read_bandwidth"));
}

TEST_CASE("eviction prefers the groups furthest from their next use when importance is equal") {
  const std::string path = temp_path("distance.halogrp");
  write_store(path, 4, 1, 64, 128);  // exchanges 0..7, one group each
  GroupStore probe(path, options(UINT64_MAX));
  const uint64_t group = probe.group_pages_bytes({0, 0, 0});
  GroupStore store(path, options(2 * group));
  store.advance(0, 0);  // exchange 0's deadline passed: it is now the furthest from reuse
  REQUIRE(store.load_now({0, 0, 0}));
  REQUIRE(store.load_now({2, 0, 0}));
  store.release({{0, 0, 0}, {2, 0, 0}});
  REQUIRE(store.load_now({1, 0, 0}));  // evicts (0, 0, 0): a whole cycle away, while (2, 0, 0) is 4 away
  store.release({{1, 0, 0}});
  REQUIRE(store.resident() == std::vector<GroupKey>{{1, 0, 0}, {2, 0, 0}});
}

TEST_CASE("eviction breaks a tie on next use and importance per byte by least recent use") {
  const std::string path = temp_path("recency.halogrp");
  write_store(path, 1, 4, 64, 128);  // groups (0, 0, i): one exchange, the same size, importance 1
  GroupStore probe(path, options(UINT64_MAX));
  const uint64_t group = probe.group_pages_bytes({0, 0, 0});
  for (const bool touch_first_again : {false, true}) {
    GroupStore store(path, options(2 * group));
    REQUIRE(store.load_now({0, 0, 0}));
    store.release({{0, 0, 0}});
    REQUIRE(store.load_now({0, 0, 1}));
    store.release({{0, 0, 1}});
    if (touch_first_again) {  // (0, 0, 0) becomes the most recently used
      REQUIRE(store.acquire({{0, 0, 0}}) == std::vector<uint8_t>{1});
      store.release({{0, 0, 0}});
    }
    REQUIRE(store.load_now({0, 0, 2}));  // room for one more: the least recently used goes
    store.release({{0, 0, 2}});
    const GroupKey kept = touch_first_again ? GroupKey{0, 0, 0} : GroupKey{0, 0, 1};
    auto expected = std::vector<GroupKey>{kept, {0, 0, 2}};
    std::sort(expected.begin(), expected.end());
    REQUIRE(store.resident() == expected);
    REQUIRE(store.stats().evictions == 1);
  }
}

TEST_CASE("the loaders fetch the groups needed soonest, the most important first, within the budget") {
  const std::string path = temp_path("loader.halogrp");
  write_store(path, 4, 4, 64, 128);
  GroupStore probe(path, options(UINT64_MAX));
  const uint64_t group = probe.group_pages_bytes({0, 0, 0});
  StoreOptions o = options(2 * group, true);
  GroupStore store(path, o);
  std::vector<GroupKey> all;
  std::vector<double> importance;
  for (const auto& g : store.groups()) {
    all.push_back(g.key);
    importance.push_back(g.key.index == 2 || g.key.index == 3 ? 1.0 : 0.01);
  }
  store.set_importance(all, importance);
  store.advance(0, 0);  // next up: exchange 1 = (0, 1), then (1, 0)
  REQUIRE(store.wait_idle(10.0));
  REQUIRE(store.resident() == std::vector<GroupKey>{{0, 1, 2}, {0, 1, 3}});
  REQUIRE(store.acquire({{0, 1, 0}, {0, 1, 2}}) == std::vector<uint8_t>{0, 1});  // (0, 1, 0) is missing
  store.release({{0, 1, 2}});
  store.advance(0, 1);  // (0, 1)'s groups are now a whole cycle away and make room for (1, 0)'s
  REQUIRE(store.wait_idle(10.0));
  REQUIRE(store.resident() == std::vector<GroupKey>{{1, 0, 2}, {1, 0, 3}});
  REQUIRE(store.stats().peak_resident_bytes <= 2 * group);
  // Importance 0: never fetched, even with room to spare.
  store.set_importance(all, std::vector<double>(all.size(), 0.0));
  store.set_budget(16 * group);
  REQUIRE(store.wait_idle(10.0));
  REQUIRE(store.resident().size() == 2);
}

TEST_CASE("pinned groups stay resident") {
  const std::string path = temp_path("pin.halogrp");
  write_store(path, 2, 2, 64, 128);
  GroupStore probe(path, options(UINT64_MAX));
  const uint64_t group = probe.group_pages_bytes({0, 0, 0});
  GroupStore store(path, options(2 * group));
  REQUIRE(store.pin({{1, 1, 1}}).empty());
  store.set_importance({{1, 1, 1}}, {0.0});
  for (const auto& g : store.groups()) {
    REQUIRE(store.load_now(g.key));
    store.release({g.key});
  }
  const auto resident = store.resident();
  REQUIRE(std::find(resident.begin(), resident.end(), GroupKey{1, 1, 1}) != resident.end());
  REQUIRE_THROWS_AS(store.pin({{0, 0, 0}, {0, 0, 1}}), InvalidArgument);  // three groups do not fit two
}

TEST_CASE("a corrupt group is reported and missing, the others still load") {
  const std::string path = temp_path("corrupt.halogrp");
  write_store(path, 2, 2, 32, 64);
  uint64_t offset = 0;
  {
    GroupStore probe(path, options(UINT64_MAX));
    offset = probe.groups()[3].offset + 10;
  }
  flip_byte(path, offset);
  GroupStore store(path, options(UINT64_MAX));
  const GroupKey bad = store.groups()[3].key;
  REQUIRE_FALSE(store.load_now(bad));
  REQUIRE(store.acquire({bad}) == std::vector<uint8_t>{0});
  const auto errors = store.errors();
  REQUIRE(errors.size() == 1);
  REQUIRE(errors[0].first == bad);
  REQUIRE(errors[0].second.find("checksum mismatch") != std::string::npos);
  REQUIRE(store.load_now(store.groups()[2].key));
  REQUIRE(store.load_now(store.groups()[4].key));
}

TEST_CASE("a truncated store keeps its intact groups, a damaged header or index fails to open") {
  const std::string path = temp_path("truncated.halogrp");
  write_store(path, 2, 2, 32, 64);
  uint64_t cut = 0, index_at = 0;
  {
    GroupStore probe(path, options(UINT64_MAX));
    cut = probe.groups()[6].offset + 5;
    index_at = 64 + 3;
  }
  const std::string whole = path + ".whole";
  std::filesystem::copy_file(path, whole, std::filesystem::copy_options::overwrite_existing);
  std::filesystem::resize_file(path, cut);
  {
    GroupStore store(path, options(UINT64_MAX));
    const auto errors = store.errors();
    REQUIRE(errors.size() == 2);  // groups 6 and 7
    REQUIRE(errors[0].second.find("truncated") != std::string::npos);
    REQUIRE_FALSE(store.load_now(store.groups()[7].key));
    REQUIRE(store.load_now(store.groups()[5].key));
  }
  std::filesystem::resize_file(path, 100);
  REQUIRE_THROWS_WITH(GroupStore(path, options(UINT64_MAX)), Catch::Contains("truncated"));
  std::filesystem::resize_file(path, 10);
  REQUIRE_THROWS_WITH(GroupStore(path, options(UINT64_MAX)), Catch::Contains("too short"));
  std::filesystem::copy_file(whole, path, std::filesystem::copy_options::overwrite_existing);
  flip_byte(path, index_at);
  REQUIRE_THROWS_WITH(GroupStore(path, options(UINT64_MAX)), Catch::Contains("index checksum mismatch"));
  std::filesystem::copy_file(whole, path, std::filesystem::copy_options::overwrite_existing);
  flip_byte(path, 9);
  REQUIRE_THROWS_WITH(GroupStore(path, options(UINT64_MAX)), Catch::Contains("header checksum mismatch"));
  REQUIRE_THROWS_WITH(GroupStore(path + ".missing", options(UINT64_MAX)), Catch::Contains("cannot open"));
}

TEST_CASE("the writer checks its input and leaves no file behind when it fails") {
  const std::string path = temp_path("writer.halogrp");
  std::filesystem::remove(path);
  std::vector<GroupSpec> layout = {{{0, 0, 0}, {{"w", Format::nf4, 64, 2, 64}}}};
  REQUIRE_THROWS_WITH(GroupStoreWriter(path, "[1]", layout), Catch::Contains("meta must be a JSON object"));
  REQUIRE_THROWS_WITH(GroupStoreWriter(path, "{}", {{{0, 0, 0}, {{"w", Format::nf4, 48, 2, 64}}}}),
                      Catch::Contains("blocksize"));
  REQUIRE_THROWS_WITH(GroupStoreWriter(path, "{}", {layout[0], layout[0]}), Catch::Contains("listed twice"));
  {
    GroupStoreWriter writer(path, "{}", layout);
    REQUIRE_THROWS_WITH(writer.write_group({0, 0, 1}, {}), Catch::Contains("expected group (0, 0, 0)"));
    const uint8_t packed[64] = {};
    const float absmax[2] = {1.0f, 1.0f};
    TensorData short_data;
    short_data.packed = packed;
    short_data.packed_bytes = 63;  // [2, 64] needs 64
    short_data.absmax = absmax;
    short_data.absmax_count = 2;
    REQUIRE_THROWS_WITH(writer.write_group({0, 0, 0}, {short_data}), Catch::Contains("needs 64 packed bytes"));
    REQUIRE_THROWS_WITH(writer.finish(), Catch::Contains("only 0 of 1"));
  }
  REQUIRE_FALSE(std::filesystem::exists(path));
  for (const auto& entry : std::filesystem::directory_iterator(std::filesystem::path(path).parent_path()))
    REQUIRE(entry.path().filename().string().find("writer.halogrp.tmp") == std::string::npos);
}

TEST_CASE("mmap mode maps every group and caps the touched bytes at the budget") {
  const std::string path = temp_path("mmap.halogrp");
  const auto data = write_store(path, 2, 2, 32, 64);
  GroupStore probe(path, options(UINT64_MAX));
  const uint64_t group = probe.group_pages_bytes({0, 0, 0});
  StoreOptions o = options(3 * group);
  o.mode = StoreOptions::Mode::mmap;
  GroupStore store(path, o);
  for (size_t i = 0; i < store.groups().size(); ++i) {
    const GroupKey key = store.groups()[i].key;
    REQUIRE(store.acquire({key}) == std::vector<uint8_t>{1});
    std::vector<float> bias(32);
    store.read_tensor(key, "b", bias.data());
    REQUIRE(std::memcmp(bias.data(), data[i][1].values.data(), bias.size() * 4) == 0);
    store.release({key});
    REQUIRE(store.stats().resident_bytes <= 3 * group);
  }
  REQUIRE(store.resident().size() <= 3);
  REQUIRE(store.stats().peak_resident_bytes <= 3 * group);
}

TEST_CASE("store formats, modes and keys are parsed by the library with errors naming the caller", "[edge_store]") {
  using namespace halo;
  CHECK(edge::parse_store_format("caller", "nf4") == Format::nf4);
  CHECK(edge::parse_store_format("caller", "fp4") == Format::fp4);
  CHECK(edge::parse_store_format("caller", "f32") == Format::f32);
  for (const char* bad : {"float32", "q4_0", "NF4", ""})
    CHECK_THROWS_WITH(edge::parse_store_format("caller", bad),
                      Catch::Contains("[caller]") && Catch::Contains(std::string("'") + bad + "'"));
  for (Format f : {Format::nf4, Format::fp4, Format::f32})
    CHECK(edge::parse_store_format("caller", edge::store_format_name(f)) == f);
  CHECK(edge::StoreOptions::parse_mode("caller", "mmap") == edge::StoreOptions::Mode::mmap);
  CHECK_THROWS_WITH(edge::StoreOptions::parse_mode("caller", "disk"), Catch::Contains("[caller]") && Catch::Contains("disk"));
  CHECK(edge::group_key("caller", 65535, 255, 65535) == edge::GroupKey{65535, 255, 65535});
  CHECK_THROWS_WITH(edge::group_key("caller", 65536, 0, 0), Catch::Contains("[caller]") && Catch::Contains("65536"));
  CHECK_THROWS_AS(edge::group_key("caller", 0, -1, 0), InvalidArgument);
  CHECK_THROWS_AS(edge::group_key("caller", 0, 0, int64_t(1) << 33), InvalidArgument);
}
