// The int8-activation 4-bit matmul on AVX-VNNI (matmul4_q8.hpp): vpdpbusd (VEX, ymm) adds
// four unsigned x signed byte products to each int32 lane without saturating. The weights
// are looked up as code8 + 128 (unsigned) and each lane starts from pack_q8's -128 * (sum of
// its x), so the sums are exact. Compiled with -mavx2 -mfma -mf16c -mavxvnni; the registry
// runs it only where the CPU has AVX-VNNI.
#include <immintrin.h>

#define HALO_Q8_YMM
#include "src/quant/matmul4_q8_vec.hpp"

namespace halo::kernels {
namespace {

struct Isa : Ymm {
  struct Table {
    I code;  // code8 + 128
  };
  static Table table(const int8_t* code) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(code));
    return {broadcast16(_mm_xor_si128(t, _mm_set1_epi8(char(0x80))))};
  }
  struct Weights {
    I low, high;
  };
  static Weights decode(const uint8_t* bytes, const Table& t) {
    I low, high;
    nibbles(bytes, low, high);
    return {_mm256_shuffle_epi8(t.code, low), _mm256_shuffle_epi8(t.code, high)};
  }
  struct X {
    I low, high, offset;
  };
  static X load_x(const std::byte* p) { return {load_i(p), load_i(p + 32), load_i(p + 64 + 4 * kLanes)}; }
  static I dot(const Weights& w, const X& x) {
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(x.offset, w.low, x.low), w.high, x.high);
  }
};

}  // namespace
}  // namespace halo::kernels

#include "src/quant/matmul4_q8_simd.hpp"

namespace halo::kernels {
const Matmul4Q8Ops kMatmul4Q8AvxVnni = kOps;
}  // namespace halo::kernels
