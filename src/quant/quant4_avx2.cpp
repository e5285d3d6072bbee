// AVX2 4-bit kernels. Compiled with -mavx2 -mf16c (no FMA contraction).
#include <cassert>
#include <immintrin.h>

#include <xsimd/xsimd.hpp>

#include "halo/quant/block.hpp"  // kAbsmaxFloor (constexpr only)
#include "src/quant/quant4_kernels.hpp"

namespace halo::kernels {
namespace {

struct Isa {
  using arch = xsimd::avx2;
  using batch = xsimd::batch<float, arch>;

  static batch load(const void* src, Format dtype, int64_t i) {
    if (dtype == Format::f32) return batch::load_unaligned(static_cast<const float*>(src) + i);
    __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(src) + i));
    if (dtype == Format::f16) return _mm256_cvtph_ps(half);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  }

  static __m256i lookup16(__m256i index, const int32_t* table) {
    __m256i low = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(table)), index);
    __m256i high = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8)), index);
    __m256 pick_high = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(low), _mm256_castsi256_ps(high), pick_high));
  }

  // 8 scaled values -> 4 bytes of codes.
  static void pack(const batch& scaled, const Codebook4& format, uint8_t* out) {
    __m256 v = scaled;
    v = _mm256_blendv_ps(v, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    __m256i rank = _mm256_setzero_si256();
    for (int t = 0; t < 15; ++t) {
      __m256 above = _mm256_cmp_ps(v, _mm256_set1_ps(format.thresholds[t]), _CMP_GT_OQ);
      rank = _mm256_sub_epi32(rank, _mm256_castps_si256(above));  // true lanes are -1
    }
    if (!format.identity_order) {
      alignas(32) int32_t table[16];
      for (int r = 0; r < 16; ++r) table[r] = format.code_of_rank[r];
      rank = lookup16(rank, table);
    }
    __m256i byte = _mm256_or_si256(_mm256_slli_epi64(rank, 4), _mm256_srli_epi64(rank, 32));
    // Byte 0 of each 64-bit lane -> 4 consecutive bytes.
    const __m256i gather = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                            0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256i picked = _mm256_shuffle_epi8(byte, gather);
    uint32_t low = uint32_t(_mm_extract_epi16(_mm256_castsi256_si128(picked), 0));
    uint32_t high = uint32_t(_mm_extract_epi16(_mm256_extracti128_si256(picked, 1), 0));
    uint32_t word = low | (high << 16);
    __builtin_memcpy(out, &word, 4);
  }

  static void store(__m256 v, Format dtype, char* out) {
    if (dtype == Format::f32) {
      _mm256_storeu_ps(reinterpret_cast<float*>(out), v);
    } else if (dtype == Format::f16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      __m256i bits = _mm256_castps_si256(v);
      __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
      __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
      rounded = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded),
                                                     _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)), nan));
      // 32-bit lanes hold values < 2^16: pack to 16 bits (packus works per 128-bit half).
      __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), packed);
    }
  }

  // 16 elements (8 bytes) of one block.
  static void dequant(const uint8_t* bytes, const float* table, float scale, Format dtype, char* out) {
    const int64_t size = dtype == Format::f32 ? 4 : 2;
    __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
    __m128i wide = _mm_cvtepu8_epi16(packed);
    __m128i high = _mm_srli_epi16(wide, 4);
    __m128i low = _mm_and_si128(wide, _mm_set1_epi16(0x0f));
    __m128i order = _mm_or_si128(high, _mm_slli_epi16(low, 8));
    const __m256 factor = _mm256_set1_ps(scale);
    const auto* table_bits = reinterpret_cast<const int32_t*>(table);
    __m256i first = lookup16(_mm256_cvtepu8_epi32(order), table_bits);
    __m256i second = lookup16(_mm256_cvtepu8_epi32(_mm_srli_si128(order, 8)), table_bits);
    store(_mm256_mul_ps(_mm256_castsi256_ps(first), factor), dtype, out);
    store(_mm256_mul_ps(_mm256_castsi256_ps(second), factor), dtype, out + 8 * size);
  }
};

}  // namespace
}  // namespace halo::kernels

#include "src/quant/quant4_simd.hpp"

namespace halo::kernels {
void quantize4_avx2(const Quant4Job& job, int64_t block_begin, int64_t block_end) {
  quantize_blocks(job, block_begin, block_end);
}
void dequantize4_avx2(const Dequant4Job& job, int64_t begin, int64_t end, void* output) {
  dequantize_range(job, begin, end, output);
}
}  // namespace halo::kernels
