// AVX2 segment-error kernel: the shared body (segment_error_simd.hpp) over 8 float lanes.
// Compiled with -mavx2 -mf16c (and -mfma off the exact paths: the library builds with -ffp-contract=off).
#include <cassert>
#include <immintrin.h>

#include <xsimd/xsimd.hpp>

#include "src/hwq/segment_error.hpp"

namespace halo::hwq::detail {
namespace {

struct Isa {
  using arch = xsimd::avx2;
  using batch = xsimd::batch<float, arch>;
  using dbatch = xsimd::batch<double, arch>;

  static batch gather(const float* table, const batch& index) {
    return _mm256_i32gather_ps(table, _mm256_cvttps_epi32(index), 4);
  }
  static void widen(const batch& v, dbatch& low, dbatch& high) {
    const __m256 lanes = v;
    low = _mm256_cvtps_pd(_mm256_castps256_ps128(lanes));
    high = _mm256_cvtps_pd(_mm256_extractf128_ps(lanes, 1));
  }
};

}  // namespace
}  // namespace halo::hwq::detail

#include "src/hwq/segment_error_simd.hpp"

namespace halo::hwq::detail {
double segment_error_avx2(const float* x, const float* s, int64_t count, const BookView& book, float scale) {
  return segment_error_body(x, s, count, book, scale);
}
}  // namespace halo::hwq::detail
