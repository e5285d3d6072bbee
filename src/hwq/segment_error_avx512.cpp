// AVX-512 weighted error of one candidate scale: 16 values per step, the same
// nearest-code decisions as the scalar NearestCode (same float operations,
// gathers from the half-step bucket table), sums kept in double lanes.
// GCC 12's avx512fintrin.h builds results from _mm512_undefined_*(), which -Wuninitialized flags falsely.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "src/hwq/segment_error.hpp"

namespace halo::hwq::detail {

namespace {

// Nearest-code index for 16 ratios; mirrors NearestCode::operator().
__m512i nearest16(__m512 r, const BookView& book) {
  const __m512 low = _mm512_set1_ps(book.low), high = _mm512_set1_ps(book.high);
  const __m512i last = _mm512_set1_epi32(book.size - 1), zero = _mm512_setzero_si512(), one = _mm512_set1_epi32(1);
  const __mmask16 above_low = _mm512_cmp_ps_mask(r, low, _CMP_GT_OQ);   // false for NaN too
  const __mmask16 at_high = _mm512_cmp_ps_mask(r, high, _CMP_GE_OQ);
  const __mmask16 inside = above_low & ~at_high;
  const __m512 doubled = _mm512_mul_ps(_mm512_set1_ps(2.0f), _mm512_sub_ps(r, low));
  const __m512i k = _mm512_cvttps_epi32(_mm512_roundscale_ps(doubled, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
  __m512i i = _mm512_mask_i32gather_epi32(zero, inside, k, book.bucket, 4);
  const __m512i below = _mm512_max_epi32(_mm512_sub_epi32(i, one), zero);
  const __m512i above = _mm512_min_epi32(_mm512_add_epi32(i, one), last);
  const __m512 at = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, i, book.values, 4);
  const __m512 lo = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, below, book.values, 4);
  const __m512 hi = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, above, book.values, 4);
  const __m512 d_at = _mm512_abs_ps(_mm512_sub_ps(r, at));
  const __m512 d_lo = _mm512_abs_ps(_mm512_sub_ps(r, lo));
  const __m512 d_hi = _mm512_abs_ps(_mm512_sub_ps(r, hi));
  const __mmask16 has_lo = _mm512_cmpgt_epi32_mask(i, zero) & inside;
  const __mmask16 has_hi = _mm512_cmplt_epi32_mask(i, last) & inside;
  const __mmask16 go_lo = has_lo & _mm512_cmp_ps_mask(d_lo, d_at, _CMP_LE_OQ);
  const __mmask16 go_hi = has_hi & ~go_lo & _mm512_cmp_ps_mask(d_hi, d_at, _CMP_LT_OQ);
  i = _mm512_mask_mov_epi32(i, go_lo, below);
  i = _mm512_mask_mov_epi32(i, go_hi, above);
  i = _mm512_mask_mov_epi32(i, at_high, last);
  return _mm512_mask_mov_epi32(i, ~(above_low | at_high), zero);
}

}  // namespace

double segment_error_avx512(const float* x, const float* s, int64_t count, const BookView& book, float scale) {
  __m512d sum_lo = _mm512_setzero_pd(), sum_hi = _mm512_setzero_pd();
  const __m512 scale_v = _mm512_set1_ps(scale);
  const bool zero_scale = scale == 0.0f;
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i), sv = _mm512_loadu_ps(s + i);
    __m512 q = _mm512_setzero_ps();
    if (!zero_scale) q = _mm512_i32gather_ps(nearest16(_mm512_div_ps(xv, scale_v), book), book.values, 4);
    const __m512 approx = _mm512_mul_ps(scale_v, q);
    const __m512d diff_lo = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(xv)),
                                          _mm512_cvtps_pd(_mm512_castps512_ps256(approx)));
    const __m512d diff_hi = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(xv, 1)),
                                          _mm512_cvtps_pd(_mm512_extractf32x8_ps(approx, 1)));
    const __m512d s_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(sv));
    const __m512d s_hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(sv, 1));
    sum_lo = _mm512_add_pd(sum_lo, _mm512_mul_pd(_mm512_mul_pd(s_lo, diff_lo), diff_lo));
    sum_hi = _mm512_add_pd(sum_hi, _mm512_mul_pd(_mm512_mul_pd(s_hi, diff_hi), diff_hi));
  }
  double error = _mm512_reduce_add_pd(_mm512_add_pd(sum_lo, sum_hi));
  if (i < count) {  // tail: the same lanes, masked
    const __mmask16 mask = static_cast<__mmask16>((1u << (count - i)) - 1u);
    const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i), sv = _mm512_maskz_loadu_ps(mask, s + i);
    __m512 q = _mm512_setzero_ps();
    if (!zero_scale) q = _mm512_i32gather_ps(nearest16(_mm512_div_ps(xv, scale_v), book), book.values, 4);
    const __m512 approx = _mm512_mul_ps(scale_v, q);
    const __m512d diff_lo = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(xv)),
                                          _mm512_cvtps_pd(_mm512_castps512_ps256(approx)));
    const __m512d diff_hi = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(xv, 1)),
                                          _mm512_cvtps_pd(_mm512_extractf32x8_ps(approx, 1)));
    const __m512d s_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(sv));
    const __m512d s_hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(sv, 1));
    error += _mm512_reduce_add_pd(_mm512_add_pd(_mm512_mul_pd(_mm512_mul_pd(s_lo, diff_lo), diff_lo),
                                                _mm512_mul_pd(_mm512_mul_pd(s_hi, diff_hi), diff_hi)));
  }
  return error;
}

}  // namespace halo::hwq::detail
