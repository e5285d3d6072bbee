// AVX512-BF16 decode GEMV for bfloat16 x: nibbles are looked up in a 32-entry
// table of the block's weights rounded to bfloat16 (vpermw reads the low 5 bits of
// each 16-bit index, so the 16 weights are stored twice), and vdpbf16ps multiplies
// 32 weight/x pairs and adds them into 16 float32 sums per instruction. Compiled
// with the AVX-512 flags plus -mavx512bf16; called only where the CPU has it.
// GCC 12 warns about the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <immintrin.h>

#include <cstdint>
#include <utility>

#include "src/quant/matmul4_special.hpp"

namespace halo::kernels::bf16 {
namespace {

// Lane j of vector v (0, 1) of a 64-element chunk: lanes 0-15 read the low nibble,
// lanes 16-31 the high nibble, of byte 2 * (j % 16) + v.
constexpr int lane_element(int v, int j) { return j < 16 ? 4 * j + 2 * v + 1 : 4 * (j - 16) + 2 * v; }

// The block's 16 weights as bfloat16, twice (vpermw reads 5 index bits). vcvtne2ps2bf16
// rounds to nearest even and flushes subnormal results to zero, as vdpbf16ps treats
// subnormal inputs anyway.
__m512i bf16_table(const float* code, float absmax) {
  const __m512 weights = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(absmax));
  return (__m512i)_mm512_cvtne2ps_pbh(weights, weights);
}

template <int Vec>
__m512i decode(__m512i chunk, __m512i table) {
  const __m512i shift = _mm512_inserti64x4(_mm512_set1_epi16(8 * Vec), _mm256_set1_epi16(8 * Vec + 4), 1);
  return _mm512_permutexvar_epi16(_mm512_srlv_epi16(chunk, shift), table);
}

constexpr int chains(int rows) { return rows <= 8 ? 2 : 1; }

template <int R>
void gemv_rows(const Matmul4Weight& w, const uint16_t* panel, int64_t o_begin, int64_t o_end, float* y, int64_t ldy) {
  constexpr int C = chains(R);
  const int64_t chunks = w.in / 64;
  const int64_t block_mask = w.blocksize - 1;
  for (int64_t o = o_begin; o < o_end; ++o) {
    __m512 acc[R][C];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int j = 0; j < C; ++j) acc[r][j] = _mm512_setzero_ps();
    const uint8_t* bytes = w.packed + o * (w.in / 2);
    int64_t flat = o * w.in;
    __m512i table = bf16_table(w.code, w.absmax[flat >> w.block_shift]);
    for (int64_t c = 0; c < chunks; ++c, flat += 64) {
      if (c != 0 && (flat & block_mask) == 0) table = bf16_table(w.code, w.absmax[flat >> w.block_shift]);
      _mm_prefetch(reinterpret_cast<const char*>(bytes + c * 32 + 1024), _MM_HINT_T0);
      const __m512i chunk = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + c * 32)));
      const __m512i w0 = decode<0>(chunk, table);
      const __m512i w1 = decode<1>(chunk, table);
      const uint16_t* xp = panel + c * R * 64;
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512i x0 = _mm512_loadu_si512(xp + r * 64);
        const __m512i x1 = _mm512_loadu_si512(xp + r * 64 + 32);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)w0, (__m512bh)x0);
        acc[r][C - 1] = _mm512_dpbf16_ps(acc[r][C - 1], (__m512bh)w1, (__m512bh)x1);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m512 total = acc[r][0];
      if constexpr (C > 1) total = _mm512_add_ps(total, acc[r][1]);
      y[r * ldy + o] = _mm512_reduce_add_ps(total);
    }
  }
}

template <int... Rs>
void dispatch_rows(int64_t rows, const Matmul4Weight& w, const uint16_t* panel, int64_t o_begin, int64_t o_end,
                   float* y, int64_t ldy, std::integer_sequence<int, Rs...>) {
  ((rows == Rs + 1 ? (gemv_rows<Rs + 1>(w, panel, o_begin, o_end, y, ldy), 0) : 0), ...);
}

}  // namespace

void gemv_pack(const uint16_t* x, int64_t rows, int64_t in, uint16_t* panel) {
  const int64_t chunks = in / 64;
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      const uint16_t* src = x + r * in + c * 64;
      uint16_t* dst = panel + (c * rows + r) * 64;
      for (int v = 0; v < 2; ++v)
        for (int j = 0; j < 32; ++j) dst[v * 32 + j] = src[lane_element(v, j)];
    }
}

void gemv(const Matmul4Weight& w, const uint16_t* panel, int64_t rows, int64_t o_begin, int64_t o_end, float* y,
          int64_t ldy) {
  dispatch_rows(rows, w, panel, o_begin, o_end, y, ldy, std::make_integer_sequence<int, 16>());
}

}  // namespace halo::kernels::bf16
