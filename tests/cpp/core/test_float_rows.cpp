// The format table's float row conversions (halo::to_float / from_float, which the
// merge's float32 working copies use) against independent conversions: GCC's _Float16
// (soft-float round to nearest even) for F16, a nearest-neighbour search over
// bfloat16's grid for BF16, and C casts for F64, on sizes that split into several
// parallel chunks.
#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "halo/core/format.hpp"

using halo::Format;

namespace {

float half_bits_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return float(h);
}

uint16_t float_to_half_bits(float x) {
  const _Float16 h = static_cast<_Float16>(x);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

bool same(float a, float b) { return std::isnan(a) ? std::isnan(b) : std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b); }

// The bfloat16 nearest to x by search: the two grid points around x (x's bits with the
// low half cleared, and the next one away from zero), ties to the even one.
uint16_t nearest_bf16(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint16_t low = uint16_t(bits >> 16), high = uint16_t(low + 1);
  const double below = std::bit_cast<float>(uint32_t(low) << 16);
  if ((bits & 0xffffu) == 0) return low;
  // high may be infinity (low is the largest finite value): round as if the grid went on.
  const double above = (high & 0x7fffu) == 0x7f80u ? std::ldexp(std::copysign(1.0, x), 128)
                                                   : double(std::bit_cast<float>(uint32_t(high) << 16));
  const double dl = std::fabs(double(x) - below), dh = std::fabs(above - double(x));
  if (dl < dh) return low;
  if (dh < dl) return high;
  return (low & 1u) ? high : low;
}

std::vector<float> awkward_floats(size_t count) {
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, 1e-8f, 5.9604645e-08f,
                          2.9802322e-08f, 2.9802326e-08f, 6.1035156e-05f, 3.3895314e38f, 3.4028235e38f,
                          std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::denorm_min(),
                          1.00390625f, 1.01171875f, 1.0009765625f, 1.0029296875f};
  std::mt19937 rng(7);
  while (v.size() < count) {
    uint32_t bits = rng();
    if (v.size() % 3 == 0) bits = (bits & 0xffff0000u) | 0x8000u;  // exact bfloat16 ties
    if (v.size() % 5 == 0) bits = (bits & 0xffffe000u) | 0x1000u;  // exact float16 ties (normal range)
    v.push_back(std::bit_cast<float>(bits));
  }
  return v;
}

}  // namespace

TEST_CASE("F16 and BF16 rows to float32 agree with independent conversions on every bit pattern", "[format]") {
  std::vector<uint16_t> all(65536);
  for (uint32_t i = 0; i < 65536; ++i) all[i] = uint16_t(i);
  std::vector<float> out(all.size());
  halo::to_float(Format::f16, all.data(), out.data(), int64_t(all.size()));
  for (uint32_t i = 0; i < 65536; ++i) REQUIRE(same(out[i], half_bits_to_float(uint16_t(i))));
  halo::to_float(Format::bf16, all.data(), out.data(), int64_t(all.size()));
  for (uint32_t i = 0; i < 65536; ++i) REQUIRE(same(out[i], std::bit_cast<float>(i << 16)));
}

TEST_CASE("float32 rows to F16 round to nearest even like _Float16", "[format]") {
  const auto x = awkward_floats(200'003);  // several parallel chunks and an odd tail
  std::vector<uint16_t> got(x.size());
  halo::from_float(Format::f16, x.data(), got.data(), int64_t(x.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    INFO("x = " << x[i] << " bits " << std::bit_cast<uint32_t>(x[i]));
    if (std::isnan(x[i])) REQUIRE(std::isnan(half_bits_to_float(got[i])));
    else REQUIRE(got[i] == float_to_half_bits(x[i]));
  }
}

TEST_CASE("float32 rows to BF16 pick the nearest bfloat16, ties to even", "[format]") {
  const auto x = awkward_floats(200'003);
  std::vector<uint16_t> got(x.size());
  halo::from_float(Format::bf16, x.data(), got.data(), int64_t(x.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    INFO("x = " << x[i] << " bits " << std::bit_cast<uint32_t>(x[i]));
    if (std::isnan(x[i])) REQUIRE(std::isnan(std::bit_cast<float>(uint32_t(got[i]) << 16)));
    else REQUIRE(got[i] == nearest_bf16(x[i]));
  }
}

TEST_CASE("F32 and F64 row conversions are casts, on awkward sizes", "[format]") {
  for (int64_t n : {0, 1, 31, 65535, 65537, 3 * 65536 + 5}) {
    const size_t count = static_cast<size_t>(n);
    std::vector<double> d(count);
    std::mt19937_64 rng(uint64_t(n) + 1);
    for (auto& v : d) v = std::bit_cast<double>(rng());
    std::vector<float> f(count), copy(count), copy2(count);
    std::vector<double> back_d(count);
    halo::to_float(Format::f64, d.data(), f.data(), n);
    for (int64_t i = 0; i < n; ++i) REQUIRE(same(f[size_t(i)], static_cast<float>(d[size_t(i)])));
    halo::from_float(Format::f64, f.data(), back_d.data(), n);
    for (int64_t i = 0; i < n; ++i)
      REQUIRE((std::isnan(f[size_t(i)]) ? std::isnan(back_d[size_t(i)]) : back_d[size_t(i)] == double(f[size_t(i)])));
    halo::from_float(Format::f32, f.data(), copy.data(), n);
    halo::to_float(Format::f32, copy.data(), copy2.data(), n);
    if (n) REQUIRE(std::memcmp(f.data(), copy2.data(), count * 4) == 0);
  }
}
