#include <catch2/catch.hpp>

#include <cstring>
#include <random>

#include "halo/core/error.hpp"
#include "halo/edge/wire.hpp"

using namespace halo::edge;

TEST_CASE("header bytes are the documented little-endian layout") {
  Header h;
  h.kind = Kind::partial;
  h.flags = kFlagDuplicate;
  h.step = 0x01020304;
  h.pos = 0x0A0B0C0D;
  h.layer = 0x1122;
  h.part = 1;
  h.group = 0x3344;
  h.row0 = 0x0005;
  h.rows = 1;
  h.cols = 2;
  const float rows[2] = {1.0f, -2.0f};
  const std::vector<uint8_t> m = make_partial(h, rows);
  const uint8_t expect[36] = {0x48, 0x4C, 0x4F, 0x45, 1,    0,    3,    2,    0x04, 0x03, 0x02, 0x01,
                              0x0D, 0x0C, 0x0B, 0x0A, 0x22, 0x11, 1,    1,    0x44, 0x33, 0x05, 0x00,
                              1,    0,    2,    0,    0,    0,    0,    0,    0x00, 0x3C, 0x00, 0xC0};
  REQUIRE(m.size() == sizeof expect);
  REQUIRE(std::memcmp(m.data(), expect, sizeof expect) == 0);
}

TEST_CASE("headers and payloads round-trip") {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    Header h;
    h.step = rng();
    h.pos = rng();
    h.layer = uint16_t(rng());
    h.part = uint8_t(rng() & 1);
    h.rows = uint16_t(1 + rng() % 5);
    h.cols = uint16_t(1 + rng() % 40);
    std::vector<float> rows(size_t(h.rows) * h.cols);
    // Values that float16 holds exactly: k / 64 for small k.
    for (float& v : rows) v = float(int(rng() % 2001) - 1000) / 64.0f;
    std::vector<uint16_t> critical(rng() % 4);
    for (auto& c : critical) c = uint16_t(rng());
    const auto m = make_input(h, critical, rows.data());
    const Header d = decode_header(m);
    REQUIRE(d.kind == Kind::input);
    REQUIRE(d.step == h.step);
    REQUIRE(d.pos == h.pos);
    REQUIRE(d.layer == h.layer);
    REQUIRE(d.part == h.part);
    REQUIRE(d.rows == h.rows);
    REQUIRE(d.cols == h.cols);
    REQUIRE(d.count == critical.size());
    std::vector<float> back(rows.size());
    payload_to_float(d, m, back.data());
    REQUIRE(back == rows);
    for (size_t i = 0; i < critical.size(); ++i)
      REQUIRE((m[kHeaderBytes + 2 * i] | (m[kHeaderBytes + 2 * i + 1] << 8)) == critical[i]);
  }
}

TEST_CASE("payload rounds to the nearest float16") {
  Header h;
  h.rows = 1;
  h.cols = 4;
  // 1 + 2^-11 is a tie between 1 and 1 + 2^-10: even mantissa wins (1); 65520 overflows to inf.
  const float rows[4] = {1.0f + 0x1.0p-11f, 1.0f + 3 * 0x1.0p-11f, 65520.0f, -0x1.0p-24f};
  const auto m = make_partial(h, rows);
  float back[4];
  payload_to_float(decode_header(m), m, back);
  REQUIRE(back[0] == 1.0f);
  REQUIRE(back[1] == 1.0f + 2 * 0x1.0p-10f);
  REQUIRE(std::isinf(back[2]));
  REQUIRE(back[3] == -0x1.0p-24f);
}

TEST_CASE("decode rejects short, foreign and inconsistent messages") {
  Header h;
  h.rows = 2;
  h.cols = 3;
  const float rows[6] = {};
  auto m = make_partial(h, rows);
  REQUIRE_THROWS_AS(decode_header(std::span<const uint8_t>(m.data(), 31)), halo::FormatError);
  auto bad = m;
  bad[0] ^= 1;
  REQUIRE_THROWS_WITH(decode_header(bad), Catch::Contains("not a halo edge message"));
  auto longer = m;
  longer.push_back(0);
  REQUIRE_THROWS_WITH(decode_header(longer), Catch::Contains("header says"));
  auto kind = m;
  kind[6] = 9;
  REQUIRE_THROWS_WITH(decode_header(kind), Catch::Contains("unknown message kind 9"));
  // Another version: decoded far enough for the caller to report it, not rejected here.
  auto future = m;
  future[4] = 7;
  REQUIRE(decode_header(future).version == 7);
  const std::string json = R"({"type":"hello"})";
  const auto c = make_control(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(json.data()), json.size()));
  REQUIRE(decode_header(c).count == json.size());
}

TEST_CASE("parity is the XOR of its members and rebuilds any one of them bit for bit") {
  std::mt19937 rng(11);
  for (uint32_t k = 1; k <= kFecMaxK; ++k) {
    std::vector<std::vector<uint8_t>> members;
    for (uint32_t i = 0; i < k; ++i) {
      Header h;
      h.step = 5;
      h.layer = 2;
      h.part = 1;
      h.group = uint16_t(3 * i);
      h.rows = 2;
      h.cols = 7;
      std::vector<float> rows(14);
      for (float& v : rows) v = float(int(rng() % 4001) - 2000) / 256.0f;
      members.push_back(make_partial(h, rows.data()));
    }
    const std::vector<std::span<const uint8_t>> spans(members.begin(), members.end());
    const auto parity = make_parity(uint16_t(k), spans);
    const Header p = decode_header(parity);
    REQUIRE(p.kind == Kind::parity);
    REQUIRE(p.count == k);
    REQUIRE(p.group == k);
    const auto ids = parity_members(p, parity);
    for (uint32_t lost = 0; lost < k; ++lost) {
      REQUIRE(ids[lost] == ParityMember{uint16_t(3 * lost), 0});
      std::vector<uint8_t> x(payload_bytes(p, parity).begin(), payload_bytes(p, parity).end());
      for (uint32_t i = 0; i < k; ++i) {
        if (i == lost) continue;
        const auto other = payload_bytes(decode_header(members[i]), members[i]);
        for (size_t b = 0; b < x.size(); ++b) x[b] ^= other[b];
      }
      const auto want = payload_bytes(decode_header(members[lost]), members[lost]);
      REQUIRE(std::equal(x.begin(), x.end(), want.begin(), want.end()));
    }
  }
}

TEST_CASE("parity messages are bounded before their size is trusted") {
  Header h;
  h.rows = 1;
  h.cols = 4;
  const float rows[4] = {1, 2, 3, 4};
  const auto member = make_partial(h, rows);
  const std::span<const uint8_t> one[1] = {member};
  const auto parity = make_parity(0, one);
  REQUIRE(decode_header(parity).count == 1);
  auto huge = parity;  // count 0xFFFFFFFF: refused by its bound, not by a size computed from it
  huge[28] = huge[29] = huge[30] = huge[31] = 0xFF;
  REQUIRE_THROWS_WITH(decode_header(huge), Catch::Contains("parity of 4294967295 members"));
  auto none = parity;
  none[28] = 0;
  REQUIRE_THROWS_WITH(decode_header(none), Catch::Contains("parity of 0 members"));
  auto shorter = parity;
  shorter.pop_back();
  REQUIRE_THROWS_WITH(decode_header(shorter), Catch::Contains("header says"));
  // Members of different shapes or exchanges, or repeated, make no set.
  Header wide = h;
  wide.cols = 5;
  const float five[5] = {};
  const auto other = make_partial(wide, five);
  const std::span<const uint8_t> mixed[2] = {member, other};
  REQUIRE_THROWS_WITH(make_parity(0, mixed), Catch::Contains("one exchange and one shape"));
  const std::span<const uint8_t> twice[2] = {member, member};
  REQUIRE_THROWS_WITH(make_parity(0, twice), Catch::Contains("repeats group"));
  REQUIRE_THROWS_WITH(make_parity(0, std::span<const std::span<const uint8_t>>{}), Catch::Contains("1 to 16"));
}
