// AVX-512 kernels of the 32-element GGUF block types (compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512dq, no FMA contraction).
#include <cassert>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include <xsimd/xsimd.hpp>

#include "halo/gguf/quants.hpp"
#include "src/gguf/blocks.hpp"
#include "src/gguf/kernels.hpp"

namespace halo::gguf::kernels {
namespace {
struct Isa {
  using arch = xsimd::avx512bw;
  static float hmax(__m512 v) { return _mm512_reduce_max_ps(v); }
  static int first_equal(__m512 v, float value) {
    const __mmask16 m = _mm512_cmp_ps_mask(v, _mm512_set1_ps(value), _CMP_EQ_OQ);
    return m ? __builtin_ctz(unsigned(m)) : -1;
  }
  static void store_i8(__m512i v, int8_t* out) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(v));
  }
  static uint32_t bit4_mask(__m512i v) { return _mm512_test_epi32_mask(v, _mm512_set1_epi32(16)); }
};
}  // namespace
}  // namespace halo::gguf::kernels

#include "src/gguf/quants_simd.hpp"

namespace halo::gguf::kernels {

void quantize_q8_0_avx512(const float* in, void* out, int64_t blocks) { quantize_q8_0(in, out, blocks); }
void quantize_q4_0_avx512(const float* in, void* out, int64_t blocks) { quantize_q_0<15>(in, out, blocks); }
void quantize_q5_0_avx512(const float* in, void* out, int64_t blocks) { quantize_q_0<31>(in, out, blocks); }

}  // namespace halo::gguf::kernels
