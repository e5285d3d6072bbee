// AVX512-BF16 decode GEMV for bfloat16 x: nibbles are looked up in a 32-entry
// table of the block's weights rounded to bfloat16 (vpermw reads the low 5 bits of
// each 16-bit index, so the 16 weights are stored twice), and vdpbf16ps multiplies
// 32 weight/x pairs and adds them into 16 float32 sums per instruction. Compiled
// with the AVX-512 flags plus -mavx512bf16; called only where the CPU has it.
// GCC 12 warns about the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <immintrin.h>

#include <algorithm>
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

// A step decodes one chunk of each of G rows of W and multiplies it with R rows of x:
// every x load serves G rows of W, every decoded weight R rows of x. Each sum has C
// independent chains (vdpbf16ps waits ~6 cycles for its sum); G * R * C accumulators fit
// the 32 registers with room for the weights (rows <= kMaxRows: more go in passes).
constexpr int group(int rows) { return rows <= 2 ? 1 : rows <= 4 ? 4 : 2; }
constexpr int chains(int rows) { return rows <= 1 ? 8 : rows <= 2 ? 4 : 1; }

template <int G, int R, int C>
struct Sums {
  __m512 acc[G][R][C];
};

// Chunk c of rows o .. o + G - 1 (their codes at bytes[g], flat index flat[g] of the chunk's
// first weight) against R rows of x into chains 2u and 2u + 1 (mod C).
template <int G, int R, int C, int U>
inline void chunk_step(const Matmul4Weight& w, const uint8_t* const (&bytes)[G], const uint16_t* panel, int64_t c,
                       const int64_t (&flat)[G], int64_t block_mask, __m512i (&table)[G], Sums<G, R, C>& sums) {
  __m512i w0[G], w1[G];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    const int64_t at = flat[g] + 64 * U;
    if ((at & block_mask) == 0) table[g] = bf16_table(w.code, w.absmax[at >> w.block_shift]);
    _mm_prefetch(reinterpret_cast<const char*>(bytes[g] + c * 32 + 1024), _MM_HINT_T0);
    const __m512i chunk =
        _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes[g] + c * 32)));
    w0[g] = decode<0>(chunk, table[g]);
    w1[g] = decode<1>(chunk, table[g]);
  }
  const uint16_t* xp = panel + c * R * 64;
  constexpr int a = (2 * U) % C, b = (2 * U + 1) % C;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512i x0 = _mm512_loadu_si512(xp + r * 64);
    const __m512i x1 = _mm512_loadu_si512(xp + r * 64 + 32);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      sums.acc[g][r][a] = _mm512_dpbf16_ps(sums.acc[g][r][a], (__m512bh)w0[g], (__m512bh)x0);
      sums.acc[g][r][b] = _mm512_dpbf16_ps(sums.acc[g][r][b], (__m512bh)w1[g], (__m512bh)x1);
    }
  }
}

template <int G, int R, int C, int... Us>
inline void chunk_steps(const Matmul4Weight& w, const uint8_t* const (&bytes)[G], const uint16_t* panel, int64_t c,
                        const int64_t (&flat)[G], int64_t block_mask, __m512i (&table)[G], Sums<G, R, C>& sums,
                        std::integer_sequence<int, Us...>) {
  (chunk_step<G, R, C, Us>(w, bytes, panel, c + Us, flat, block_mask, table, sums), ...);
}

// Chunks [c0, c1) of rows o .. o + G - 1 into `sums`.
template <int G, int R, int C>
inline void span(const Matmul4Weight& w, const uint16_t* panel, int64_t o, int64_t c0, int64_t c1,
                 Sums<G, R, C>& sums) {
  constexpr int U = C / 2 > 0 ? C / 2 : 1;  // chunks per step
  const int64_t block_mask = w.blocksize - 1;
  const uint8_t* bytes[G];
  int64_t flat[G];
  __m512i table[G];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    bytes[g] = w.packed + (o + g) * (w.in / 2);
    flat[g] = (o + g) * w.in + 64 * c0;
    table[g] = bf16_table(w.code, w.absmax[flat[g] >> w.block_shift]);
  }
  int64_t c = c0;
  for (; c + U <= c1; c += U) {
    chunk_steps<G, R, C>(w, bytes, panel, c, flat, block_mask, table, sums, std::make_integer_sequence<int, U>());
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) flat[g] += 64 * U;
  }
  for (; c < c1; ++c) {
    chunk_step<G, R, C, 0>(w, bytes, panel, c, flat, block_mask, table, sums);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) flat[g] += 64;
  }
}

template <int G, int R, int C>
Sums<G, R, C> zero_sums() {
  Sums<G, R, C> sums;
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < C; ++j) sums.acc[g][r][j] = _mm512_setzero_ps();
  return sums;
}

template <int G, int R, int C>
inline void reduce_into(const Sums<G, R, C>& sums, int64_t o, float* y, int64_t ldy) {
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m512 total = sums.acc[g][r][0];
#pragma GCC unroll 8
      for (int j = 1; j < C; ++j) total = _mm512_add_ps(total, sums.acc[g][r][j]);
      y[r * ldy + o + g] = _mm512_reduce_add_ps(total);
    }
}

// x's panel is re-read for every group of W's rows. Where it outgrows L1 (several rows of
// x, long rows), W's rows go in blocks of kRowBlock and k in slices whose share of the
// panel stays in L1; a block's sums wait in a small buffer between slices.
constexpr int64_t kPanelL1Bytes = 32 * 1024;
constexpr int64_t kSliceBytes = 16 * 1024;
constexpr int64_t kRowBlock = 8;

// Rows [o_begin, o_end) of W, G at a time; the rest one at a time.
template <int G, int R>
void rows_at(const Matmul4Weight& w, const uint16_t* panel, int64_t o_begin, int64_t o_end, float* y, int64_t ldy) {
  constexpr int C = G == 1 ? chains(R) : 1;
  const int64_t chunks = w.in / 64;
  const int64_t whole = o_begin + (o_end - o_begin) / G * G;
  if (chunks * R * 128 <= kPanelL1Bytes) {
    for (int64_t o = o_begin; o < whole; o += G) {
      Sums<G, R, C> sums = zero_sums<G, R, C>();
      span<G, R, C>(w, panel, o, 0, chunks, sums);
      reduce_into<G, R, C>(sums, o, y, ldy);
    }
  } else {
    static_assert(kRowBlock % 4 == 0 && kRowBlock >= G);
    const int64_t slice = std::max<int64_t>(1, kSliceBytes / (R * 128));
    Sums<G, R, C> partial[kRowBlock / G];
    for (int64_t ob = o_begin; ob < whole; ob += kRowBlock) {
      const int64_t groups = (std::min(whole, ob + kRowBlock) - ob) / G;
      for (int64_t q = 0; q < groups; ++q) partial[q] = zero_sums<G, R, C>();
      for (int64_t c0 = 0; c0 < chunks; c0 += slice)
        for (int64_t q = 0; q < groups; ++q) {
          Sums<G, R, C> sums = partial[q];
          span<G, R, C>(w, panel, ob + q * G, c0, std::min(chunks, c0 + slice), sums);
          partial[q] = sums;
        }
      for (int64_t q = 0; q < groups; ++q) reduce_into<G, R, C>(partial[q], ob + q * G, y, ldy);
    }
  }
  if constexpr (G > 1)
    if (whole < o_end) rows_at<1, R>(w, panel, whole, o_end, y, ldy);
}

template <int R>
void gemv_rows(const Matmul4Weight& w, const uint16_t* panel, int64_t o_begin, int64_t o_end, float* y, int64_t ldy) {
  rows_at<group(R), R>(w, panel, o_begin, o_end, y, ldy);
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
  dispatch_rows(rows, w, panel, o_begin, o_end, y, ldy, std::make_integer_sequence<int, kMaxRows>());
}

}  // namespace halo::kernels::bf16
