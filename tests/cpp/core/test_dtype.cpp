// Half-precision conversions against an independent computation in double.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>

#include "halo/core/convert.hpp"

using namespace halo;

namespace {
// Nearest representable value among the decoded candidates, ties to even.
template <typename Decode>
uint16_t nearest(float x, Decode decode) {
  uint16_t best = 0;
  double best_err = INFINITY;
  for (uint32_t h = 0; h < 65536; ++h) {
    float v = decode(uint16_t(h));
    if (std::isnan(v)) continue;
    double err = std::fabs(double(v) - double(x));
    if (err < best_err || (err == best_err && (h & 1) == 0 && std::signbit(v) == std::signbit(x))) {
      best = uint16_t(h);
      best_err = err;
    }
  }
  return best;
}
}  // namespace

TEST_CASE("f16 and bf16 decode then encode is the identity", "[dtype]") {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = f16_to_float(uint16_t(h));
    if (!std::isnan(f)) REQUIRE(float_to_f16(f) == h);
    float g = bf16_to_float(uint16_t(h));
    if (!std::isnan(g)) REQUIRE(float_to_bf16(g) == h);
  }
}

TEST_CASE("float to f16/bf16 rounds to nearest even", "[dtype]") {
  std::mt19937 rng(1);
  std::uniform_int_distribution<uint32_t> bits;
  for (int k = 0; k < 300; ++k) {
    uint32_t b = bits(rng);
    // Stay in ranges the brute force handles (finite, within f16 range for f16).
    float x;
    std::memcpy(&x, &b, 4);
    if (!std::isfinite(x)) continue;
    float xs = std::ldexp(std::fmod(x, 1.0f), int(b % 40) - 26);  // spans f16 subnormals..65504
    if (std::fabs(xs) < 65504.0f) REQUIRE(float_to_f16(xs) == nearest(xs, f16_to_float));
    REQUIRE(float_to_bf16(x) == nearest(x, bf16_to_float));
  }
  CHECK(float_to_f16(65520.0f) == 0x7c00);
  CHECK(float_to_bf16(NAN) == 0x7fc0);
}
