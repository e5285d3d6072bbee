// AVX2 4-bit matmul kernels: the ISA adapter for matmul4_simd.hpp. Compiled with
// -mavx2 -mf16c only; a CPU with AVX2 need not have FMA, so `fma` is a multiply
// and an add.
//
// GEMV decode: a 64-element chunk (32 bytes) fills one ymm register; shifting every
// 32-bit lane right by 4 * v brings nibble v of each lane to the bottom, and a
// 16-entry look-up (two vpermps and a blend on bit 3) gives 8 weights.
// GCC 12 warns about the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <immintrin.h>

#include <cstdint>

#include "src/quant/matmul4_kernels.hpp"

namespace halo::kernels {
namespace {

struct Isa {
  static constexpr int W = 8;
  using V = __m256;

  static __m256i mask(int lanes) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_n(const float* p, int lanes) {
    return lanes >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask(lanes));
  }
  static void store_n(float* p, V v, int lanes) {
    if (lanes >= 8)
      _mm256_storeu_ps(p, v);
    else
      _mm256_maskstore_ps(p, mask(lanes), v);
  }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V fma(V a, V b, V c) { return _mm256_add_ps(_mm256_mul_ps(a, b), c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float sum(V v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
  }
  static void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p + 1024), _MM_HINT_T0); }

  template <Format P>
  static __m256 round_to(__m256 v) {
    if constexpr (P == Format::bf16) {
      const __m256i bits = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
      rounded = _mm256_and_si256(rounded, _mm256_set1_epi32(int(0xffff0000u)));
      const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
      return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), nan);
    } else if constexpr (P == Format::f16) {
      return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      return v;
    }
  }

  struct Table {
    __m256 low, high;  // weights of codes 0-7 and 8-15
  };
  template <Format P>
  static Table table(const float* code, float absmax) {
    const __m256 scale = _mm256_set1_ps(absmax);
    return {round_to<P>(_mm256_mul_ps(_mm256_loadu_ps(code), scale)),
            round_to<P>(_mm256_mul_ps(_mm256_loadu_ps(code + 8), scale))};
  }
  static Table table(const float* code, float absmax, Format precision) {
    if (precision == Format::bf16) return table<Format::bf16>(code, absmax);
    if (precision == Format::f16) return table<Format::f16>(code, absmax);
    return table<Format::f32>(code, absmax);
  }
  // Looks up the low 4 bits of each lane (higher bits are ignored).
  static V lookup(__m256i index, const Table& table) {
    const __m256 low = _mm256_permutevar8x32_ps(table.low, index);
    const __m256 high = _mm256_permutevar8x32_ps(table.high, index);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
  }

  // Vector v holds nibble v of every 32-bit lane: even v the low nibble of byte
  // 4l + v/2 (the odd element), odd v the high nibble (the even element).
  static constexpr int kChunkVecs = 8;
  static constexpr int lane_element(int v, int l) { return v % 2 == 0 ? 8 * l + v + 1 : 8 * l + v - 1; }
  using Chunk = __m256i;
  static Chunk load_chunk(const uint8_t* bytes) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)); }
  template <int Vec>
  static V decode(const Chunk& chunk, const Table& table) {
    return lookup(_mm256_srli_epi32(chunk, 4 * Vec), table);
  }

  // 8 bytes -> 16 weights in natural order, twice.
  static void decode16(const uint8_t* bytes, const Table& table, float* out) {
    const __m128i wide = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    const __m128i order =
        _mm_or_si128(_mm_srli_epi16(wide, 4), _mm_slli_epi16(_mm_and_si128(wide, _mm_set1_epi16(0x0f)), 8));
    _mm256_storeu_ps(out, lookup(_mm256_cvtepu8_epi32(order), table));
    _mm256_storeu_ps(out + 8, lookup(_mm256_cvtepu8_epi32(_mm_srli_si128(order, 8)), table));
  }
  static void decode32(const uint8_t* bytes, const Table& table, float* out) {
    decode16(bytes, table, out);
    decode16(bytes + 8, table, out + 16);
  }

  static constexpr int chains(int rows) { return rows <= 2 ? 4 : rows <= 4 ? 2 : 1; }
  static constexpr int group(int rows) { return rows <= 2 ? 2 : 1; }
  static constexpr int kGemvMaxRows = 8;
  static constexpr int kGemmRows = 6;
  static constexpr int kGemmVecs = 2;
};

}  // namespace
}  // namespace halo::kernels

#include "src/quant/matmul4_simd.hpp"

namespace halo::kernels {
const Matmul4Ops kMatmul4Avx2 = kOps;
void gemm_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
              int64_t cols, int64_t depth) {
  gemm(a, lda, b, ldb, c, ldc, rows, cols, depth);
}
}  // namespace halo::kernels
