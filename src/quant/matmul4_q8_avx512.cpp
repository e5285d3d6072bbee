// The int8-activation 4-bit matmul on AVX-512 (F, BW) without VNNI (matmul4_q8.hpp):
// vpmaddubsw on zmm, the weights as |code8| and x negated where its weight is negative
// (AVX-512 has no vpsignb: a masked subtraction from zero). Compiled with the AVX-512 flags.
// GCC 12 warns about the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <immintrin.h>

#define HALO_Q8_ZMM
#include "src/quant/matmul4_q8_vec.hpp"

namespace halo::kernels {
namespace {

struct Isa : Zmm {
  struct Table {
    I code, magnitude;
  };
  static Table table(const int8_t* code) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(code));
    return {broadcast16(t), broadcast16(_mm_abs_epi8(t))};
  }
  struct Weights {
    I magnitude;
    __mmask64 negative;
  };
  static Weights decode(const uint8_t* bytes, const Table& t) {
    const I index = nibbles(bytes);
    return {_mm512_shuffle_epi8(t.magnitude, index), _mm512_movepi8_mask(_mm512_shuffle_epi8(t.code, index))};
  }
  struct X {
    I q;
  };
  static X load_x(const std::byte* p) { return {load_i(p)}; }
  static I dot(const Weights& w, const X& x) {
    const I signed_x = _mm512_mask_sub_epi8(x.q, w.negative, _mm512_setzero_si512(), x.q);
    return _mm512_madd_epi16(_mm512_maddubs_epi16(w.magnitude, signed_x), _mm512_set1_epi16(1));
  }
};

}  // namespace
}  // namespace halo::kernels

#include "src/quant/matmul4_q8_simd.hpp"

namespace halo::kernels {
const Matmul4Q8Ops kMatmul4Q8Avx512 = kOps;
}  // namespace halo::kernels
