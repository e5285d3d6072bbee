// Private: the inner loop of the weighted scale search, with raw pointers only so
// that the AVX-512 translation unit shares no inline code with plain code.
#pragma once

#include <cstdint>

namespace halo::hwq::detail {

struct BookView {
  const float* values;  // sorted integer code values
  int size;
  const int32_t* bucket;  // nearest index per half-step bucket from values[0]
  float low, high;        // values[0], values[size - 1]
};

// sum s * (x - scale * q(x / scale))^2, with q the nearest book value (ties to the smaller one).
double segment_error_avx512(const float* x, const float* s, int64_t count, const BookView& book, float scale);

}  // namespace halo::hwq::detail
