// AVX-512 segment-error kernel: the shared body (segment_error_simd.hpp) over 16 float lanes.
// GCC 12's avx512fintrin.h builds results from _mm512_undefined_*(), which -Wuninitialized flags falsely.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cassert>
#include <immintrin.h>

#include <xsimd/xsimd.hpp>

#include "src/hwq/segment_error.hpp"

namespace halo::hwq::detail {
namespace {

struct Isa {
  using arch = xsimd::avx512bw;
  using batch = xsimd::batch<float, arch>;
  using dbatch = xsimd::batch<double, arch>;

  static batch gather(const float* table, const batch& index) {
    return _mm512_i32gather_ps(_mm512_cvttps_epi32(index), table, 4);
  }
  static void widen(const batch& v, dbatch& low, dbatch& high) {
    const __m512 lanes = v;
    low = _mm512_cvtps_pd(_mm512_castps512_ps256(lanes));
    high = _mm512_cvtps_pd(_mm512_extractf32x8_ps(lanes, 1));
  }
};

}  // namespace
}  // namespace halo::hwq::detail

#include "src/hwq/segment_error_simd.hpp"

namespace halo::hwq::detail {
double segment_error_avx512(const float* x, const float* s, int64_t count, const BookView& book, float scale) {
  return segment_error_body(x, s, count, book, scale);
}
}  // namespace halo::hwq::detail
