// The int8-activation 4-bit matmul on AVX512-VNNI (matmul4_q8.hpp): one vpdpbusd per 64
// weights and row of x. The weights are looked up as code8 + 128 (unsigned) and each int32
// lane starts from pack_q8's -128 * (sum of its x), so the sums are exact. Compiled with the
// AVX-512 flags and -mavx512vnni; the registry runs it only where the CPU has AVX512-VNNI.
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
    I code;  // code8 + 128
  };
  static Table table(const int8_t* code) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(code));
    return {broadcast16(_mm_xor_si128(t, _mm_set1_epi8(char(0x80))))};
  }
  struct Weights {
    I code;
  };
  static Weights decode(const uint8_t* bytes, const Table& t) { return {_mm512_shuffle_epi8(t.code, nibbles(bytes))}; }
  struct X {
    I q, offset;
  };
  static X load_x(const std::byte* p) { return {load_i(p), load_i(p + 64 + 4 * kLanes)}; }
  static I dot(const Weights& w, const X& x) { return _mm512_dpbusd_epi32(x.offset, w.code, x.q); }
};

}  // namespace
}  // namespace halo::kernels

#include "src/quant/matmul4_q8_simd.hpp"

namespace halo::kernels {
const Matmul4Q8Ops kMatmul4Q8Avx512Vnni = kOps;
}  // namespace halo::kernels
