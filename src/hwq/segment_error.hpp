// Private: the inner loop of HALO's weighted scale search, one entry per CPU
// backend. Per-ISA translation units include only this header and xsimd (raw
// pointers, no inline code shared with plain code), so nothing compiled with
// AVX flags leaks into scalar code.
#pragma once

#include <cstdint>

#include "halo/backend/backend.hpp"

namespace halo::hwq::detail {

struct BookView {
  const float* values;  // sorted integer code values
  int size;
  const float* bucket;  // nearest index (as a float) per half-step bucket from values[0]
  const float* mids;    // size - 1 midpoints between neighbours (exact: integers / 2)
  float low, high;      // values[0], values[size - 1]
};

// Books up to this size pick the index by counting the midpoints below x (no table lookups but the last).
inline constexpr int kSmallBook = 16;

// sum s * (x - scale * q(x / scale))^2 in double, with q the book value whose cell holds x / scale: the
// number of midpoints strictly below it (nearest value, ties to the smaller one; NaN to the first);
// q = 0 when scale is 0.
using SegmentErrorFn = double (*)(const float* x, const float* s, int64_t count, const BookView& book, float scale);

double segment_error_scalar(const float* x, const float* s, int64_t count, const BookView& book, float scale);
double segment_error_avx2(const float* x, const float* s, int64_t count, const BookView& book, float scale);
double segment_error_avx512(const float* x, const float* s, int64_t count, const BookView& book, float scale);

// Through halo::dispatch (the kernel registry, table "hwq_segment_error"): the entry for `requested`
// (HALO_BACKEND and the CPU for automatic); BackendUnavailable for cuda, which has none.
SegmentErrorFn segment_error_kernel(Backend requested);

}  // namespace halo::hwq::detail
