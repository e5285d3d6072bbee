// AVX2 kernels of the 32-element GGUF block types (compiled with -mavx2 -mf16c,
// no FMA contraction).
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
  using arch = xsimd::avx2;
  static float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_shuffle_ps(m, m, 0x4E));
    m = _mm_max_ps(m, _mm_shuffle_ps(m, m, 0xB1));
    return _mm_cvtss_f32(m);
  }
  static int first_equal(__m256 v, float value) {
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(value), _CMP_EQ_OQ));
    return m ? __builtin_ctz(unsigned(m)) : -1;
  }
  // The low byte of each 32-bit lane (a truncation, as a C cast to int8 is; no saturation).
  static void store_i8(__m256i v, int8_t* out) {
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i bytes = _mm256_shuffle_epi8(v, pick);
    const int32_t low = _mm_cvtsi128_si32(_mm256_castsi256_si128(bytes));
    const int32_t high = _mm_cvtsi128_si32(_mm256_extracti128_si256(bytes, 1));
    std::memcpy(out, &low, 4);
    std::memcpy(out + 4, &high, 4);
  }
  static uint32_t bit4_mask(__m256i v) {
    return uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 27))));
  }
};
}  // namespace
}  // namespace halo::gguf::kernels

#include "src/gguf/quants_simd.hpp"

namespace halo::gguf::kernels {

void quantize_q8_0_avx2(const float* in, void* out, int64_t blocks) { quantize_q8_0(in, out, blocks); }
void quantize_q4_0_avx2(const float* in, void* out, int64_t blocks) { quantize_q_0<15>(in, out, blocks); }
void quantize_q5_0_avx2(const float* in, void* out, int64_t blocks) { quantize_q_0<31>(in, out, blocks); }

}  // namespace halo::gguf::kernels
