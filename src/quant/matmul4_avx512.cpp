// AVX-512 (F, BW, VL, DQ) 4-bit matmul kernels: the ISA adapter for matmul4_simd.hpp.
// Compiled with the AVX-512 flags only (src/CMakeLists.txt).
//
// GEMV decode: a 64-element chunk (32 bytes) is broadcast to both halves of a zmm
// register and shifted per lane (vpsrlvd) so that vpermps, which reads only the low
// 4 bits of each index, looks every nibble up in the block's 16-entry table of
// weights: 4 shifts + 4 permutes per 64 weights, no unpacking.
// GCC 12 warns about the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <immintrin.h>

#include <cstdint>

#include "src/quant/matmul4_kernels.hpp"

namespace halo::kernels {
namespace {

struct Isa {
  static constexpr int W = 16;
  using V = __m512;

  static __mmask16 mask(int lanes) { return lanes >= 16 ? __mmask16(0xffff) : __mmask16((1u << lanes) - 1u); }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_n(const float* p, int lanes) { return _mm512_maskz_loadu_ps(mask(lanes), p); }
  static void store_n(float* p, V v, int lanes) { _mm512_mask_storeu_ps(p, mask(lanes), v); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
  static void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p + 1024), _MM_HINT_T0); }

  // Rounds float32 lanes to bfloat16 / float16 precision (nearest even, NaN stays
  // NaN, subnormals kept), as halo's scalar conversions do.
  template <Format P>
  static __m512 round_to(__m512 v) {
    if constexpr (P == Format::bf16) {
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
      rounded = _mm512_and_si512(rounded, _mm512_set1_epi32(int(0xffff0000u)));
      rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
      return _mm512_castsi512_ps(rounded);
    } else if constexpr (P == Format::f16) {
      return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      return v;
    }
  }

  struct Table {
    __m512 values;
  };
  template <Format P>
  static Table table(const float* code, float absmax) {
    return {round_to<P>(_mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(absmax)))};
  }
  template <Format P>
  using GemvTable = Table;
  template <Format P>
  static Table gemv_table(const float* code, float absmax) {
    return table<P>(code, absmax);
  }
  static Table table(const float* code, float absmax, Format precision) {
    if (precision == Format::bf16) return table<Format::bf16>(code, absmax);
    if (precision == Format::f16) return table<Format::f16>(code, absmax);
    return table<Format::f32>(code, absmax);
  }

  // Chunk layout: lanes 0-7 read the low nibble, lanes 8-15 the high nibble, of byte
  // 4 * (l % 8) + v; the high nibble holds the even element.
  static constexpr int kChunkVecs = 4;
  template <Format P>
  static constexpr int lane_element(int v, int l) { return l < 8 ? 8 * l + 2 * v + 1 : 8 * (l - 8) + 2 * v; }
  using Chunk = __m512i;
  static Chunk load_chunk(const uint8_t* bytes) {
    return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  }
  template <int Vec, Format P>
  static V decode(const Chunk& chunk, const Table& table) {
    const __m512i shift = _mm512_setr_epi32(8 * Vec, 8 * Vec, 8 * Vec, 8 * Vec, 8 * Vec, 8 * Vec, 8 * Vec, 8 * Vec,
                                            8 * Vec + 4, 8 * Vec + 4, 8 * Vec + 4, 8 * Vec + 4, 8 * Vec + 4,
                                            8 * Vec + 4, 8 * Vec + 4, 8 * Vec + 4);
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(chunk, shift), table.values);
  }

  // 16 bytes -> 32 weights in natural order (high nibble first).
  static void decode32(const uint8_t* bytes, const Table& table, float* out) {
    const __m256i wide = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    const __m256i order = _mm256_or_si256(_mm256_srli_epi16(wide, 4),
                                          _mm256_slli_epi16(_mm256_and_si256(wide, _mm256_set1_epi16(0x0f)), 8));
    const __m512i first = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(order));
    const __m512i second = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(order, 1));
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(first, table.values));
    _mm512_storeu_ps(out + 16, _mm512_permutexvar_ps(second, table.values));
  }

  // Independent accumulators per row, so few rows do not wait on FMA latency.
  static constexpr int chains(int rows, int group) { return group > 1 ? 1 : rows <= 2 ? 4 : rows <= 8 ? 2 : 1; }
  static constexpr int group(int rows) { return rows <= 4 ? 4 : rows <= 8 ? 2 : 1; }
  static constexpr int kGemvMaxRows = 8;  // 9..16 rows: two passes (x of 16 rows would stream from L2)
  static constexpr int kGemmRows = 12;
  static constexpr int kGemmVecs = 2;
};

}  // namespace
}  // namespace halo::kernels

#include "src/quant/matmul4_simd.hpp"

namespace halo::kernels {
const Matmul4Ops kMatmul4Avx512 = kOps;
void gemm_avx512(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                int64_t cols, int64_t depth) {
  gemm(a, lda, b, ldb, c, ldc, rows, cols, depth);
}
}  // namespace halo::kernels
