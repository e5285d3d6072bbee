// AVX-512 (F+BW) 4-bit kernels. Compiled with -mavx512f -mavx512bw -mavx512vl.
#include <cassert>
#include <immintrin.h>

#include <xsimd/xsimd.hpp>

#include "halo/quant/block.hpp"  // kAbsmaxFloor (constexpr only)
#include "src/quant/quant4_kernels.hpp"

namespace halo::kernels {
namespace {

struct Isa {
  using arch = xsimd::avx512bw;
  using batch = xsimd::batch<float, arch>;

  static batch load(const void* src, Format dtype, int64_t i) {
    if (dtype == Format::f32) return batch::load_unaligned(static_cast<const float*>(src) + i);
    __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(src) + i));
    if (dtype == Format::f16) return _mm512_cvtph_ps(half);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }

  // 16 scaled values -> 8 bytes of codes.
  static void pack(const batch& scaled, const Codebook4& format, uint8_t* out) {
    __m512 v = scaled;
    // NaN -> +inf so it lands in the top bucket.
    v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_ps(__builtin_inff()));
    __m512i rank = _mm512_setzero_si512();
    const __m512i one = _mm512_set1_epi32(1);
    for (int t = 0; t < 15; ++t) {
      __mmask16 above = _mm512_cmp_ps_mask(v, _mm512_set1_ps(format.thresholds[t]), _CMP_GT_OQ);
      rank = _mm512_mask_add_epi32(rank, above, rank, one);
    }
    if (!format.identity_order) {
      alignas(64) int32_t table[16];
      for (int r = 0; r < 16; ++r) table[r] = format.code_of_rank[r];
      rank = _mm512_permutexvar_epi32(rank, _mm512_load_si512(table));
    }
    // 64-bit lane = even | odd << 32  ->  byte (even << 4) | odd.
    __m512i byte = _mm512_or_si512(_mm512_slli_epi64(rank, 4), _mm512_srli_epi64(rank, 32));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm512_cvtepi64_epi8(byte));
  }

  static __m512 expand16(const uint8_t* bytes, const float* table, float scale) {
    __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
    __m128i wide = _mm_cvtepu8_epi16(packed);
    __m128i high = _mm_srli_epi16(wide, 4);
    __m128i low = _mm_and_si128(wide, _mm_set1_epi16(0x0f));
    __m128i order = _mm_or_si128(high, _mm_slli_epi16(low, 8));  // bytes: hi0 lo0 hi1 lo1 ...
    __m512i index = _mm512_cvtepu8_epi32(order);
    return _mm512_mul_ps(_mm512_permutexvar_ps(index, _mm512_loadu_ps(table)), _mm512_set1_ps(scale));
  }

  static void store(__m512 v, Format dtype, char* out) {
    if (dtype == Format::f32) {
      _mm512_storeu_ps(reinterpret_cast<float*>(out), v);
    } else if (dtype == Format::f16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      __m512i bits = _mm512_castps_si512(v);
      __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
      rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(rounded));
    }
  }

  // 32 elements (16 bytes) of one block.
  static void dequant(const uint8_t* bytes, const float* table, float scale, Format dtype, char* out) {
    const int64_t size = dtype == Format::f32 ? 4 : 2;
    store(expand16(bytes, table, scale), dtype, out);
    store(expand16(bytes + 8, table, scale), dtype, out + 16 * size);
  }
};

}  // namespace
}  // namespace halo::kernels

#include "src/quant/quant4_simd.hpp"

namespace halo::kernels {
void quantize4_avx512(const Quant4Job& job, int64_t block_begin, int64_t block_end) {
  quantize_blocks(job, block_begin, block_end);
}
void dequantize4_avx512(const Dequant4Job& job, int64_t begin, int64_t end, void* output) {
  dequantize_range(job, begin, end, output);
}
}  // namespace halo::kernels
