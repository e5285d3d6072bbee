// The int8-activation 4-bit matmul on AVX2 (matmul4_q8.hpp): vpmaddubsw multiplies unsigned
// by signed bytes, so the weights enter as |code8| and x takes their signs (vpsignb; a zero
// weight zeroes its x). A pair sum is at most 2 * 127 * 127 < 2^15: vpmaddubsw never saturates.
// Compiled with -mavx2 -mfma -mf16c only.
#include <immintrin.h>

#define HALO_Q8_YMM
#include "src/quant/matmul4_q8_vec.hpp"

namespace halo::kernels {
namespace {

struct Isa : Ymm {
  struct Table {
    I code, magnitude;
  };
  static Table table(const int8_t* code) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(code));
    return {broadcast16(t), broadcast16(_mm_abs_epi8(t))};
  }
  struct Weights {
    I low, high, low_abs, high_abs;
  };
  static Weights decode(const uint8_t* bytes, const Table& t) {
    I low, high;
    nibbles(bytes, low, high);
    return {_mm256_shuffle_epi8(t.code, low), _mm256_shuffle_epi8(t.code, high),
            _mm256_shuffle_epi8(t.magnitude, low), _mm256_shuffle_epi8(t.magnitude, high)};
  }
  struct X {
    I low, high;
  };
  static X load_x(const std::byte* p) { return {load_i(p), load_i(p + 32)}; }
  static I dot(const Weights& w, const X& x) {
    const I ones = _mm256_set1_epi16(1);
    const I low = _mm256_madd_epi16(_mm256_maddubs_epi16(w.low_abs, _mm256_sign_epi8(x.low, w.low)), ones);
    const I high = _mm256_madd_epi16(_mm256_maddubs_epi16(w.high_abs, _mm256_sign_epi8(x.high, w.high)), ones);
    return _mm256_add_epi32(low, high);
  }
};

}  // namespace
}  // namespace halo::kernels

#include "src/quant/matmul4_q8_simd.hpp"

namespace halo::kernels {
const Matmul4Q8Ops kMatmul4Q8Avx2 = kOps;
}  // namespace halo::kernels
