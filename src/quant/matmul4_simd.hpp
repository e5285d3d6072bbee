// Body of the SIMD 4-bit matmul kernels and of the float GEMM they share with the
// LoRA layer, written once against an ISA adapter.
//
// Included by exactly one translation unit per ISA (matmul4_avx2.cpp,
// matmul4_avx512.cpp) after it defines `Isa` with:
//   W, V                          float lanes per vector, the vector type
//   zero, load, load_n, store_n, set1, fma (a*b + c), add, sum
//   Table, table(code, absmax, precision)     one block's 16 weights, rounded to precision
//   GemvTable<P>, gemv_table<P>(code, absmax) the same as the GEMV's decode reads it
//   kChunkVecs = 64 / W, Chunk, load_chunk(32 bytes), decode<v, P>(chunk, gemv table)
//                                  vector v of a 64-element chunk, lane l holding
//                                  element lane_element<P>(v, l) (an order that needs
//                                  few shuffles; x is permuted to match once per call)
//   decode32(16 bytes, table, out) 32 elements in natural order (for GEMM panels)
//   group(rows)                    rows of W decoded together in the GEMV (x loads shared)
//   chains(rows, group)            independent accumulators per row and W row
//   kGemvMaxRows, kGemmRows, kGemmVecs
// Everything here has internal linkage: nothing is shared with plain code.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "src/quant/matmul4_kernels.hpp"

namespace halo::kernels {
namespace {

using V = Isa::V;
constexpr int kW = Isa::W;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- fused GEMV --------------------------------------------------------------------------------

template <Format P>
void gemv_pack_at(const float* x32, int64_t rows, int64_t in, float* panel) {
  const int64_t chunks = in / 64;
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = x32 + r * in + c * 64;
      float* dst = panel + (c * rows + r) * 64;
      for (int v = 0; v < Isa::kChunkVecs; ++v)
        for (int l = 0; l < kW; ++l) dst[v * kW + l] = src[Isa::template lane_element<P>(v, l)];
    }
}

void gemv_pack(const float* x32, int64_t rows, int64_t in, float* panel, Format precision) {
  switch (precision) {
    case Format::bf16: return gemv_pack_at<Format::bf16>(x32, rows, in, panel);
    case Format::f16: return gemv_pack_at<Format::f16>(x32, rows, in, panel);
    default: return gemv_pack_at<Format::f32>(x32, rows, in, panel);
  }
}

// One k-chunk of G rows of W against R rows of x: each vector of x is loaded once and
// used for all G weight rows, each decoded weight vector for all R rows of x.
template <int R, int G, int C, Format P, int Vec>
inline void gemv_step(const typename Isa::Chunk (&chunk)[G], const typename Isa::template GemvTable<P> (&table)[G],
                      const float* xp, V (&acc)[G][R][C]) {
  V xv[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) xv[r] = Isa::load(xp + r * 64 + Vec * kW);
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    const V weights = Isa::template decode<Vec, P>(chunk[g], table[g]);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[g][r][Vec % C] = Isa::fma(weights, xv[r], acc[g][r][Vec % C]);
  }
}

template <int R, int G, int C, Format P, int... Vecs>
inline void gemv_chunk(const typename Isa::Chunk (&chunk)[G], const typename Isa::template GemvTable<P> (&table)[G],
                       const float* xp, V (&acc)[G][R][C], std::integer_sequence<int, Vecs...>) {
  (gemv_step<R, G, C, P, Vecs>(chunk, table, xp, acc), ...);
}

template <int R, int G, int C>
struct GemvSums {
  V acc[G][R][C];
};

template <int R, int G, int C>
GemvSums<R, G, C> gemv_zero() {
  GemvSums<R, G, C> sums;
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < C; ++j) sums.acc[g][r][j] = Isa::zero();
  return sums;
}

// Chunks [c0, c1) of rows [o, o + G) of W against R rows of x: the weight bytes stream
// through once, each 64-element chunk decoded in registers, added to `sums` (taken and
// returned by value, so the accumulators stay in registers inside).
template <int R, int G, int C, Format P>
GemvSums<R, G, C> gemv_span(const Matmul4Weight& w, const float* panel, int64_t o, int64_t c0, int64_t c1,
                            GemvSums<R, G, C> sums) {
  const int64_t block_mask = w.blocksize - 1;
  const uint8_t* bytes = w.packed + o * (w.in / 2);
  const int64_t row_bytes = w.in / 2;
  int64_t flat = o * w.in + 64 * c0;
  V acc[G][R][C];  // a local array: a by-value struct parameter lives in the caller's memory
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < C; ++j) acc[g][r][j] = sums.acc[g][r][j];
  typename Isa::template GemvTable<P> table[G];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
    table[g] = Isa::template gemv_table<P>(w.code, w.absmax[(flat + g * w.in) >> w.block_shift]);
  for (int64_t c = c0; c < c1; ++c, flat += 64) {
    typename Isa::Chunk chunk[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const int64_t start = flat + g * w.in;
      if (c != c0 && (start & block_mask) == 0)
        table[g] = Isa::template gemv_table<P>(w.code, w.absmax[start >> w.block_shift]);
      Isa::prefetch(bytes + g * row_bytes + c * 32);
      chunk[g] = Isa::load_chunk(bytes + g * row_bytes + c * 32);
    }
    gemv_chunk<R, G, C, P>(chunk, table, panel + c * R * 64, acc, std::make_integer_sequence<int, Isa::kChunkVecs>());
  }
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < C; ++j) sums.acc[g][r][j] = acc[g][r][j];
  return sums;
}

template <int R, int G, int C>
void gemv_reduce(const GemvSums<R, G, C>& sums, int64_t o, float* y, int64_t ldy) {
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      V total = sums.acc[g][r][0];
#pragma GCC unroll 4
      for (int j = 1; j < C; ++j) total = Isa::add(total, sums.acc[g][r][j]);
      y[r * ldy + o + g] = Isa::sum(total);
    }
}

// x's panel is re-read for every group of W's rows. Where it outgrows L1 (several rows of
// x, long rows), W's rows go in blocks of kGemvRowBlock and k in slices whose share of the
// panel stays in L1; a block's sums wait in a small buffer between slices.
constexpr int64_t kGemvPanelL1Bytes = 64 * 1024;
constexpr int64_t kGemvSliceBytes = 32 * 1024;
constexpr int64_t kGemvRowBlock = 8;

// Rows [o_begin, o_end) of W, G at a time; the rest one at a time.
template <int R, int G, Format P>
void gemv_rows_group(const Matmul4Weight& w, const float* panel, int64_t o_begin, int64_t o_end, float* y,
                     int64_t ldy) {
  constexpr int C = Isa::chains(R, G);
  constexpr int64_t kChunkBytes = R * 64 * int64_t(sizeof(float));  // of the panel
  const int64_t chunks = w.in / 64;
  const int64_t whole = o_begin + (o_end - o_begin) / G * G;
  if (chunks * kChunkBytes <= kGemvPanelL1Bytes) {
    for (int64_t o = o_begin; o < whole; o += G) {
      gemv_reduce<R, G, C>(gemv_span<R, G, C, P>(w, panel, o, 0, chunks, gemv_zero<R, G, C>()), o, y, ldy);
    }
  } else {
    static_assert(kGemvRowBlock % 4 == 0 && kGemvRowBlock >= G);
    const int64_t slice = std::max<int64_t>(1, kGemvSliceBytes / kChunkBytes);
    GemvSums<R, G, C> partial[kGemvRowBlock / G];
    for (int64_t ob = o_begin; ob < whole; ob += kGemvRowBlock) {
      const int64_t groups = (std::min(whole, ob + kGemvRowBlock) - ob) / G;
      for (int64_t q = 0; q < groups; ++q) partial[q] = gemv_zero<R, G, C>();
      for (int64_t c0 = 0; c0 < chunks; c0 += slice)
        for (int64_t q = 0; q < groups; ++q)
          partial[q] = gemv_span<R, G, C, P>(w, panel, ob + q * G, c0, std::min(chunks, c0 + slice), partial[q]);
      for (int64_t q = 0; q < groups; ++q) gemv_reduce<R, G, C>(partial[q], ob + q * G, y, ldy);
    }
  }
  if constexpr (G > 1)
    if (whole < o_end) gemv_rows_group<R, 1, P>(w, panel, whole, o_end, y, ldy);
}

template <int R, Format P>
void gemv_rows_at(const Matmul4Weight& w, const float* panel, int64_t o_begin, int64_t o_end, float* y, int64_t ldy) {
  gemv_rows_group<R, Isa::group(R), P>(w, panel, o_begin, o_end, y, ldy);
}

// The weight precision is a template argument so the per-block table needs no branch.
template <int R>
void gemv_rows(const Matmul4Weight& w, const float* panel, int64_t o_begin, int64_t o_end, float* y, int64_t ldy) {
  switch (w.precision) {
    case Format::bf16: gemv_rows_at<R, Format::bf16>(w, panel, o_begin, o_end, y, ldy); break;
    case Format::f16: gemv_rows_at<R, Format::f16>(w, panel, o_begin, o_end, y, ldy); break;
    default: gemv_rows_at<R, Format::f32>(w, panel, o_begin, o_end, y, ldy); break;
  }
}

template <int... Rs>
void gemv_dispatch(int64_t rows, const Matmul4Weight& w, const float* panel, int64_t o_begin, int64_t o_end,
                   float* y, int64_t ldy, std::integer_sequence<int, Rs...>) {
  ((rows == Rs + 1 ? (gemv_rows<Rs + 1>(w, panel, o_begin, o_end, y, ldy), 0) : 0), ...);
}

void gemv(const Matmul4Weight& w, const float* panel, int64_t rows, int64_t o_begin, int64_t o_end, float* y,
          int64_t ldy) {
  gemv_dispatch(rows, w, panel, o_begin, o_end, y, ldy, std::make_integer_sequence<int, Isa::kGemvMaxRows>());
}

// ---- panel decode for the GEMM -----------------------------------------------------------------

void decode(const Matmul4Weight& w, int64_t o0, int64_t o1, int64_t k0, int64_t k1, float* out, int64_t ld) {
  for (int64_t o = o0; o < o1; ++o) {
    float* dst = out + (o - o0) * ld;
    const int64_t begin = o * w.in + k0, end = o * w.in + k1;
    const int64_t head_end = min64(end, (begin + 31) / 32 * 32);
    if (head_end > begin) matmul4_decode_scalar(w, o, o + 1, k0, k0 + (head_end - begin), dst, ld);
    int64_t i = head_end;
    int64_t block = -1;
    typename Isa::Table table{};
    for (; i + 32 <= end; i += 32) {
      if (i >> w.block_shift != block) {
        block = i >> w.block_shift;
        table = Isa::table(w.code, w.absmax[block], w.precision);
      }
      Isa::decode32(w.packed + i / 2, table, dst + (i - begin));
    }
    if (i < end) matmul4_decode_scalar(w, o, o + 1, i - o * w.in, k1, dst + (i - begin), ld);
  }
}

// ---- register-blocked GEMM: c += a b ------------------------------------------------------------

// Rows x (Vecs * W) of c in registers; each step broadcasts one value of a per row
// and loads Vecs vectors of b. `last` = valid lanes of the last vector when Partial.
template <int Rows, int Vecs, bool Partial>
void micro_kernel(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t depth,
                  int last) {
  V acc[Rows][Vecs];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < Vecs; ++v) acc[r][v] = Isa::zero();
  for (int64_t l = 0; l < depth; ++l) {
    V bv[Vecs];
#pragma GCC unroll 4
    for (int v = 0; v < Vecs; ++v)
      bv[v] = (Partial && v == Vecs - 1) ? Isa::load_n(b + l * ldb + v * kW, last) : Isa::load(b + l * ldb + v * kW);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const V av = Isa::set1(a[r * lda + l]);
#pragma GCC unroll 4
      for (int v = 0; v < Vecs; ++v) acc[r][v] = Isa::fma(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < Vecs; ++v) {
      float* dst = c + r * ldc + v * kW;
      const int lanes = (Partial && v == Vecs - 1) ? last : kW;
      Isa::store_n(dst, Isa::add(Isa::load_n(dst, lanes), acc[r][v]), lanes);
    }
}

// Columns [0, cols) of b are stored in panels `panel_width` wide (a multiple of the
// register tile), column j at b[(j / panel_width) * panel_stride + l * ldb + j % panel_width].
struct BPanels {
  int64_t ldb, panel_width, panel_stride;
  const float* column(const float* b, int64_t j) const { return b + (j / panel_width) * panel_stride + j % panel_width; }
};

template <int Rows>
void column_sweep(const float* a, int64_t lda, const float* b, const BPanels& layout, float* c, int64_t ldc,
                  int64_t cols, int64_t depth) {
  constexpr int64_t kCols = Isa::kGemmVecs * kW;
  const int64_t ldb = layout.ldb;
  int64_t j = 0;
  for (; j + kCols <= cols; j += kCols)
    micro_kernel<Rows, Isa::kGemmVecs, false>(a, lda, layout.column(b, j), ldb, c + j, ldc, depth, kW);
  const int64_t rest = cols - j;
  if (rest <= 0) return;
  const int last = int(rest - (rest - 1) / kW * kW);
  if (rest <= kW)
    micro_kernel<Rows, 1, true>(a, lda, layout.column(b, j), ldb, c + j, ldc, depth, last);
  else if constexpr (Isa::kGemmVecs >= 2)
    micro_kernel<Rows, Isa::kGemmVecs, true>(a, lda, layout.column(b, j), ldb, c + j, ldc, depth, last);
}

template <int... Hs>
void row_tail(int64_t height, const float* a, int64_t lda, const float* b, const BPanels& layout, float* c,
              int64_t ldc, int64_t cols, int64_t depth, std::integer_sequence<int, Hs...>) {
  ((height == Hs + 1 ? (column_sweep<Hs + 1>(a, lda, b, layout, c, ldc, cols, depth), 0) : 0), ...);
}

// Row blocks of a outside, column panels inside: the kGemmRows rows of a stay in L1
// while the (L2-resident) b passes under them.
void gemm_layout(const float* a, int64_t lda, const float* b, const BPanels& layout, float* c, int64_t ldc,
                 int64_t rows, int64_t cols, int64_t depth) {
  int64_t i = 0;
  for (; i + Isa::kGemmRows <= rows; i += Isa::kGemmRows)
    column_sweep<Isa::kGemmRows>(a + i * lda, lda, b, layout, c + i * ldc, ldc, cols, depth);
  if (i < rows)
    row_tail(rows - i, a + i * lda, lda, b, layout, c + i * ldc, ldc, cols, depth,
             std::make_integer_sequence<int, Isa::kGemmRows - 1>());
}

void gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
          int64_t cols, int64_t depth) {
  const int64_t whole = (cols + Isa::kGemmVecs * kW - 1) / (Isa::kGemmVecs * kW) * (Isa::kGemmVecs * kW);
  gemm_layout(a, lda, b, BPanels{ldb, whole, 0}, c, ldc, rows, cols, depth);
}

void gemm_panels(const float* a, int64_t lda, const float* b, int64_t panel_stride, float* c, int64_t ldc,
                 int64_t rows, int64_t cols, int64_t depth) {
  gemm_layout(a, lda, b, BPanels{kGemmPanel, kGemmPanel, panel_stride}, c, ldc, rows, cols, depth);
}

constexpr Matmul4Ops kOps = {Isa::kGemvMaxRows, gemv_pack, gemv, decode, gemm, gemm_panels, Isa::kGemmRows,
                             Isa::kGemmVecs * kW};

}  // namespace
}  // namespace halo::kernels
