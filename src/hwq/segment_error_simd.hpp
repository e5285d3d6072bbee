// Body of the SIMD segment-error kernel, written once against an ISA adapter.
//
// Included by exactly one translation unit per ISA (segment_error_avx2.cpp,
// segment_error_avx512.cpp) after it defines `Isa` with:
//   using arch = xsimd::<tag>;
//   static batch gather(const float* table, const batch& index)   index holds exact non-negative integers
//   static void widen(const batch& v, dbatch& low, dbatch& high)  float lanes -> two double batches
// It makes the scalar reference's decisions lane by lane (same float operations); the tail goes to the
// scalar reference, and only the order of the double sums differs.
#pragma once

namespace halo::hwq::detail {
namespace {

using batch = xsimd::batch<float, Isa::arch>;
using dbatch = xsimd::batch<double, Isa::arch>;
constexpr int64_t kWidth = int64_t(batch::size);

// Book value of each lane's cell; the same decisions as nearest_index (book_table.hpp).
inline batch nearest_value(const batch& r, const BookView& book) {
  const batch zero(0.0f), one(1.0f), last(static_cast<float>(book.size - 1));
  if (book.size <= kSmallBook) {  // count the midpoints below r: compares only, one lookup
    batch index = zero;
    for (int j = 0; j + 1 < book.size; ++j) index += xsimd::select(r > batch(book.mids[j]), one, zero);
    return Isa::gather(book.values, index);
  }
  const batch low(book.low), high(book.high);
  const auto above_low = r > low;  // false for NaN
  const auto at_high = r >= high;
  const auto inside = above_low & ~at_high;
  const batch bucket = xsimd::select(inside, xsimd::floor(batch(2.0f) * (r - low)), zero);
  batch i = Isa::gather(book.bucket, bucket);
  const batch below = xsimd::max(i - one, zero), above = xsimd::min(i, last - one);
  const auto go_lo = (i > zero) & (r <= Isa::gather(book.mids, below));
  const auto go_hi = (i < last) & ~go_lo & (r > Isa::gather(book.mids, above));
  i = xsimd::select(go_lo, i - one, xsimd::select(go_hi, i + one, i));
  i = xsimd::select(at_high, last, xsimd::select(inside, i, zero));
  return Isa::gather(book.values, i);
}

inline double segment_error_body(const float* x, const float* s, int64_t count, const BookView& book,
                                 float scale) {
  const batch scale_v(scale);
  const bool zero_scale = scale == 0.0f;
  dbatch sum_lo(0.0), sum_hi(0.0);
  int64_t i = 0;
  for (; i + kWidth <= count; i += kWidth) {
    const batch xv = batch::load_unaligned(x + i), sv = batch::load_unaligned(s + i);
    const batch q = zero_scale ? batch(0.0f) : nearest_value(xv / scale_v, book);
    dbatch x_lo, x_hi, a_lo, a_hi, s_lo, s_hi;
    Isa::widen(xv, x_lo, x_hi);
    Isa::widen(scale_v * q, a_lo, a_hi);
    Isa::widen(sv, s_lo, s_hi);
    const dbatch diff_lo = x_lo - a_lo, diff_hi = x_hi - a_hi;
    sum_lo += (s_lo * diff_lo) * diff_lo;
    sum_hi += (s_hi * diff_hi) * diff_hi;
  }
  double error = xsimd::hadd(sum_lo + sum_hi);
  if (i < count) error += segment_error_scalar(x + i, s + i, count - i, book, scale);
  return error;
}

}  // namespace
}  // namespace halo::hwq::detail
