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

// Independent accumulators per row: vdpbf16ps waits ~6 cycles for its sum, so one row
// needs 8 chains (4 chunks in flight) to keep the decode, not the latency, the limit.
constexpr int chains(int rows) { return rows <= 1 ? 8 : rows <= 2 ? 4 : rows <= 8 ? 2 : 1; }

template <int R, int C>
struct Rows {
  __m512 acc[R][C];
};

// Chunk c of row o against R rows of x into chains 2u and 2u + 1 (mod C).
template <int R, int C, int U>
inline void chunk_step(const Matmul4Weight& w, const uint8_t* bytes, const uint16_t* panel, int64_t c, int64_t flat,
                       int64_t block_mask, __m512i& table, Rows<R, C>& rows) {
  if (c != 0 && (flat & block_mask) == 0) table = bf16_table(w.code, w.absmax[flat >> w.block_shift]);
  _mm_prefetch(reinterpret_cast<const char*>(bytes + c * 32 + 1024), _MM_HINT_T0);
  const __m512i chunk = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + c * 32)));
  const __m512i w0 = decode<0>(chunk, table);
  const __m512i w1 = decode<1>(chunk, table);
  const uint16_t* xp = panel + c * R * 64;
  constexpr int a = (2 * U) % C, b = (2 * U + 1) % C;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512i x0 = _mm512_loadu_si512(xp + r * 64);
    const __m512i x1 = _mm512_loadu_si512(xp + r * 64 + 32);
    rows.acc[r][a] = _mm512_dpbf16_ps(rows.acc[r][a], (__m512bh)w0, (__m512bh)x0);
    rows.acc[r][b] = _mm512_dpbf16_ps(rows.acc[r][b], (__m512bh)w1, (__m512bh)x1);
  }
}

template <int R, int C, int... Us>
inline void chunk_steps(const Matmul4Weight& w, const uint8_t* bytes, const uint16_t* panel, int64_t c, int64_t flat,
                        int64_t block_mask, __m512i& table, Rows<R, C>& rows, std::integer_sequence<int, Us...>) {
  (chunk_step<R, C, Us>(w, bytes, panel, c + Us, flat + 64 * Us, block_mask, table, rows), ...);
}

template <int R>
void gemv_rows(const Matmul4Weight& w, const uint16_t* panel, int64_t o_begin, int64_t o_end, float* y, int64_t ldy) {
  constexpr int C = chains(R);
  constexpr int U = C / 2 > 0 ? C / 2 : 1;  // chunks per step
  const int64_t chunks = w.in / 64;
  const int64_t block_mask = w.blocksize - 1;
  for (int64_t o = o_begin; o < o_end; ++o) {
    Rows<R, C> rows;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < C; ++j) rows.acc[r][j] = _mm512_setzero_ps();
    const uint8_t* bytes = w.packed + o * (w.in / 2);
    const int64_t flat = o * w.in;
    __m512i table = bf16_table(w.code, w.absmax[flat >> w.block_shift]);
    int64_t c = 0;
    for (; c + U <= chunks; c += U)
      chunk_steps<R, C>(w, bytes, panel, c, flat + 64 * c, block_mask, table, rows, std::make_integer_sequence<int, U>());
    for (; c < chunks; ++c) chunk_step<R, C, 0>(w, bytes, panel, c, flat + 64 * c, block_mask, table, rows);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m512 total = rows.acc[r][0];
#pragma GCC unroll 8
      for (int j = 1; j < C; ++j) total = _mm512_add_ps(total, rows.acc[r][j]);
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
