// AdamW8bit: every SIMD backend equals the scalar reference bit for bit on awkward
// sizes; the first step equals an independent double-precision AdamW; states
// re-encode to the nearest code; bad settings throw with the function's name.
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "halo/core/codebooks.hpp"
#include "halo/core/error.hpp"
#include "halo/optim/adamw8bit.hpp"

using namespace halo;

namespace {

struct Run {
  std::vector<float> param;
  std::vector<uint8_t> state1, state2;
  std::vector<float> absmax1, absmax2;
};

Run run_steps(int64_t n, Backend backend, int steps, float grad_scale) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  Run r;
  r.param.resize(n);
  for (float& v : r.param) v = normal(rng);
  r.state1.assign(n, 0);
  r.state2.assign(n, 0);
  const int64_t blocks = (n + 255) / 256;
  r.absmax1.assign(blocks, 0.0f);
  r.absmax2.assign(blocks, 0.0f);
  std::vector<float> grad(n);
  for (int t = 1; t <= steps; ++t) {
    for (int64_t i = 0; i < n; ++i) grad[i] = normal(rng) * grad_scale + (i % 97 == 0 ? 0.0f : 1e-3f);
    if (n > 600) grad[300] = 0.0f;
    AdamW8bitSettings s;
    s.lr = 1e-2f;
    s.step = t;
    adamw8bit_step(r.param.data(), grad.data(), Format::f32, n, r.state1.data(), r.state2.data(), r.absmax1.data(),
                   r.absmax2.data(), s, backend);
  }
  return r;
}

}  // namespace

TEST_CASE("AdamW8bit SIMD kernels equal the scalar reference bit for bit", "[optim]") {
  for (Backend backend : {Backend::avx2, Backend::avx512}) {
    if (!backend_available(backend)) continue;
    for (int64_t n : {1, 31, 255, 256, 257, 511, 512, 4096 + 33, 70000}) {
      for (float scale : {1.0f, 1e-6f, 1e4f}) {
        const Run ref = run_steps(n, Backend::scalar, 4, scale);
        const Run fast = run_steps(n, backend, 4, scale);
        INFO("backend " << int(backend) << " n " << n << " scale " << scale);
        REQUIRE(ref.param == fast.param);
        REQUIRE(ref.state1 == fast.state1);
        REQUIRE(ref.state2 == fast.state2);
        REQUIRE(ref.absmax1 == fast.absmax1);
        REQUIRE(ref.absmax2 == fast.absmax2);
      }
    }
  }
}

TEST_CASE("AdamW8bit's first step equals double-precision AdamW from zero moments", "[optim]") {
  const int64_t n = 1000;
  std::vector<float> param(n), grad(n);
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < n; ++i) {
    param[i] = normal(rng);
    grad[i] = normal(rng) * 0.1f;
  }
  const std::vector<float> start = param;
  std::vector<uint8_t> s1(n, 0), s2(n, 0);
  std::vector<float> a1(4, 0.0f), a2(4, 0.0f);
  AdamW8bitSettings s;
  s.lr = 1e-3f;
  s.weight_decay = 0.1f;
  adamw8bit_step(param.data(), grad.data(), Format::f32, n, s1.data(), s2.data(), a1.data(), a2.data(), s,
                 Backend::scalar);
  for (int64_t i = 0; i < n; ++i) {
    const double g = grad[i];
    const double m = 0.1 * g, v = 0.001 * g * g;
    const double expected = start[i] * (1.0 - 1e-3 * 0.1) - 1e-3 / 0.1 * m / (std::sqrt(v) / std::sqrt(0.001) + 1e-8);
    REQUIRE(std::fabs(param[i] - expected) <= 1e-6 * (1.0 + std::fabs(expected)));
  }
  // The stored first moment decodes to within one code step of 0.1 g.
  for (int64_t i = 0; i < n; ++i) {
    const double decoded = kDynamicMapSigned[s1[i]] * a1[i / 256];
    const double exact = 0.1 * grad[i];
    REQUIRE(std::fabs(decoded - exact) <= 0.02 * a1[i / 256] + 1e-12);
  }
  // The block absmax is the largest |m| of the block.
  double largest = 0.0;
  for (int64_t i = 0; i < 256; ++i) largest = std::max(largest, std::fabs(0.1 * double(grad[i])));
  REQUIRE(std::fabs(a1[0] - largest) <= 1e-6 * largest);
}

TEST_CASE("AdamW8bit encodes each moment to the nearest code of the dynamic maps", "[optim]") {
  const int64_t n = 256;
  std::vector<float> param(n, 0.0f), grad(n);
  for (int64_t i = 0; i < n; ++i) grad[i] = std::ldexp(1.0f, -int(i % 40)) * (i % 2 ? -1.0f : 1.0f);
  std::vector<uint8_t> s1(n, 0), s2(n, 0);
  std::vector<float> a1(1, 0.0f), a2(1, 0.0f);
  AdamW8bitSettings s;
  adamw8bit_step(param.data(), grad.data(), Format::f32, n, s1.data(), s2.data(), a1.data(), a2.data(), s,
                 Backend::scalar);
  const auto& unsigned_map = dynamic_map_unsigned();
  for (int64_t i = 0; i < n; ++i) {
    const float m = grad[i] * (1.0f - s.beta1), v = (grad[i] * grad[i]) * (1.0f - s.beta2);
    const float x1 = m * (1.0f / a1[0]), x2 = v * (1.0f / a2[0]);
    for (int code = 0; code < 256; ++code) {
      REQUIRE(std::fabs(kDynamicMapSigned[s1[i]] - x1) <= std::fabs(kDynamicMapSigned[code] - x1));
      REQUIRE(std::fabs(unsigned_map[s2[i]] - x2) <= std::fabs(unsigned_map[code] - x2));
    }
  }
}

TEST_CASE("AdamW8bit rejects bad settings by name", "[optim]") {
  std::vector<float> param(8, 1.0f), grad(8, 1.0f);
  std::vector<uint8_t> s1(8), s2(8);
  std::vector<float> a1(1), a2(1);
  auto step_with = [&](AdamW8bitSettings s, Format dtype = Format::f32, int64_t n = 8) {
    adamw8bit_step(param.data(), grad.data(), dtype, n, s1.data(), s2.data(), a1.data(), a2.data(), s);
  };
  AdamW8bitSettings s;
  s.beta1 = 1.0f;
  REQUIRE_THROWS_WITH(step_with(s), Catch::Contains("adamw8bit_step") && Catch::Contains("beta1"));
  s = {};
  s.step = 0;
  REQUIRE_THROWS_WITH(step_with(s), Catch::Contains("step must be >= 1"));
  s = {};
  s.lr = NAN;
  REQUIRE_THROWS_WITH(step_with(s), Catch::Contains("lr"));
  REQUIRE_THROWS_WITH(step_with({}, Format::f32, 0), Catch::Contains("empty"));
  REQUIRE_THROWS_AS(step_with({}, Format::u8), TypeMismatch);
}
