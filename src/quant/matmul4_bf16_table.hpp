// A block's 16 weights as bfloat16 (code * absmax rounded to nearest even, NaN as
// 0x7fc0, exactly as halo's scalar float_to_bf16), stored twice so that vpermw,
// which reads the low 5 bits of each 16-bit index, can look any nibble up.
// For the AVX512-BF16 and AMX translation units only (internal linkage).
#pragma once

#include <immintrin.h>

namespace halo::kernels {
namespace {

inline __m512i bf16_table(const float* code, float absmax) {
  const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(absmax));
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  const __m256i half = _mm512_cvtepi32_epi16(rounded);
  return _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
}

}  // namespace
}  // namespace halo::kernels
