// Seeded test data shared by the Catch2 suites.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace halo::test {

// n draws of N(0, scale^2) from mt19937(seed), in order.
inline std::vector<float> normal(int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> out(static_cast<size_t>(n));
  for (float& v : out) v = dist(rng);
  return out;
}

}  // namespace halo::test
