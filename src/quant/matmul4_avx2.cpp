// AVX2 4-bit matmul kernels: the ISA adapter for matmul4_simd.hpp. Compiled with
// -mavx2 -mfma -mf16c only (the avx2 backend requires all three).
//
// GEMV decode: a 64-element chunk (32 bytes) fills one ymm register.
//  - bfloat16 weights (bfloat16 x): the block's 16 weights are two 16-byte tables, their
//    high and their low bytes; vpshufb looks 32 nibbles up in each, vpunpck{l,h}bw pairs
//    the bytes into bfloat16 words and a shift or a mask makes them float32: 4 shuffles
//    per 32 weights, the other work on the ALU ports (vpermps would need 8, plus blends).
//  - float32 / float16 weights: shifting every 32-bit lane right by 4 * v brings nibble v
//    of each lane to the bottom, and a 16-entry look-up (two vpermps and a blend on bit 3)
//    gives 8 weights.
// GCC 12 warns about the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

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
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
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
  // The GEMV's tables: bfloat16 weights as byte tables (both 128-bit halves hold all 16
  // entries: vpshufb looks up within a half), the other precisions as `Table`.
  struct ByteTable {
    __m256i low, high;  // byte 2 and byte 3 of each weight's float32 bits (its bfloat16)
  };
  template <Format P>
  using GemvTable = std::conditional_t<P == Format::bf16, ByteTable, Table>;
  template <Format P>
  static GemvTable<P> gemv_table(const float* code, float absmax) {
    if constexpr (P != Format::bf16) {
      return table<P>(code, absmax);
    } else {
      const __m256 scale = _mm256_set1_ps(absmax);
      __m256i w0 = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(code), scale));
      __m256i w1 = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(code + 8), scale));
      if (absmax - absmax == 0.0f) {  // finite: no NaN among the weights, round to nearest even
        const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
        w0 = _mm256_add_epi32(w0, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(w0, 16), one)));
        w1 = _mm256_add_epi32(w1, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(w1, 16), one)));
      } else {
        w0 = _mm256_castps_si256(round_to<Format::bf16>(_mm256_castsi256_ps(w0)));
        w1 = _mm256_castps_si256(round_to<Format::bf16>(_mm256_castsi256_ps(w1)));
      }
      // Per 128-bit half, w0's byte 2s to bytes 0-3 and byte 3s to bytes 8-11, w1's to 4-7
      // and 12-15; then the 32-bit groups are gathered so each half holds all 16 entries.
      const __m256i take0 = _mm256_setr_epi8(2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15, -1, -1, -1, -1, 2, 6, 10, 14,
                                             -1, -1, -1, -1, 3, 7, 11, 15, -1, -1, -1, -1);
      const __m256i take1 = _mm256_setr_epi8(-1, -1, -1, -1, 2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15, -1, -1, -1,
                                             -1, 2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15);
      const __m256i both = _mm256_or_si256(_mm256_shuffle_epi8(w0, take0), _mm256_shuffle_epi8(w1, take1));
      return {_mm256_permutevar8x32_epi32(both, _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5)),
              _mm256_permutevar8x32_epi32(both, _mm256_setr_epi32(2, 6, 3, 7, 2, 6, 3, 7))};
    }
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

  // float32 / float16: vector v holds nibble v of every 32-bit lane: even v the low
  // nibble of byte 4l + v/2 (the odd element), odd v the high nibble (the even element).
  // bfloat16: v = 4 * nibble + 2 * part + word, nibble 0 the low (odd element), 1 the high;
  // lane l = 4h + m holds byte 16h + 8 * part + 2m + word of the chunk.
  static constexpr int kChunkVecs = 8;
  template <Format P>
  static constexpr int lane_element(int v, int l) {
    if constexpr (P == Format::bf16) {
      const int byte = 16 * (l / 4) + 8 * ((v / 2) % 2) + 2 * (l % 4) + v % 2;
      return 2 * byte + (v < 4 ? 1 : 0);
    } else {
      return v % 2 == 0 ? 8 * l + v + 1 : 8 * l + v - 1;
    }
  }
  using Chunk = __m256i;
  static Chunk load_chunk(const uint8_t* bytes) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)); }
  template <int Vec, Format P>
  static V decode(const Chunk& chunk, const GemvTable<P>& table) {
    if constexpr (P == Format::bf16) {
      const __m256i low4 = _mm256_set1_epi8(0x0f);
      const __m256i nibbles =
          Vec < 4 ? _mm256_and_si256(chunk, low4) : _mm256_and_si256(_mm256_srli_epi16(chunk, 4), low4);
      const __m256i low = _mm256_shuffle_epi8(table.low, nibbles), high = _mm256_shuffle_epi8(table.high, nibbles);
      const __m256i words = (Vec / 2) % 2 == 0 ? _mm256_unpacklo_epi8(low, high) : _mm256_unpackhi_epi8(low, high);
      return _mm256_castsi256_ps(Vec % 2 == 0 ? _mm256_slli_epi32(words, 16)
                                              : _mm256_and_si256(words, _mm256_set1_epi32(int(0xffff0000u))));
    } else {
      // The blend mask (bit 3 of the nibble in the sign bit) is shifted from the chunk
      // directly: no wait on the index shift, and none at all for the top nibble.
      const __m256i index = Vec == 0 ? chunk : _mm256_srli_epi32(chunk, 4 * Vec);
      const __m256i select = Vec == 7 ? chunk : _mm256_slli_epi32(chunk, 28 - 4 * Vec);
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(table.low, index), _mm256_permutevar8x32_ps(table.high, index),
                              _mm256_castsi256_ps(select));
    }
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

  // Independent accumulators per row of x and of W: an add waits 4 cycles, so one
  // chain per row would leave the FMA ports idle at 1-2 rows.
  static constexpr int chains(int rows, int group) { return rows * group <= 1 ? 4 : rows * group <= 4 ? 2 : 1; }
  static constexpr int group(int rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : 1; }
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
