// Body of the int8-activation 4-bit matmul kernels (matmul4_q8.hpp), written once against
// an ISA adapter. Included by exactly one translation unit per entry after it defines `Isa`:
//   kLanes                 int32 lanes of a dot product (8: ymm, 16: zmm; pack_q8's layout)
//   F, I                   float32 and int32 vector types
//   Table, table(code8)    the 16 int8 codes as the adapter looks them up
//   Weights, decode(32 bytes, table)   a 64-element chunk of W in the order of pack_q8
//   X, load_x(chunk)       a row's chunk of x (its int8 values, and offsets where used)
//   dot(weights, x) -> I   exact int32 sums, lane j over the products pack_q8 gives lane j
//   cvt, load_scale, set1, mul, fma, add, sum, zero, prefetch
//   group(rows), chains(rows, group), kMaxRows
// Everything here has internal linkage: nothing is shared with plain code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include "src/quant/matmul4_q8.hpp"

namespace halo::kernels {
namespace {

using F = Isa::F;
constexpr int64_t kChunkBytes = q8_chunk_bytes(Isa::kLanes);

// Chunk c of W rows [o, o + G) against R rows of x into accumulator J of each (g, r).
template <int R, int G, int C, int J>
inline void q8_step(const Q8Weight& w, const uint8_t* bytes, int64_t row_bytes, int64_t flat, int64_t c,
                    const std::byte* x, const typename Isa::Table& table, F (&acc)[G][R][C]) {
  typename Isa::Weights weights[G];
  F scale[G];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    const uint8_t* p = bytes + g * row_bytes + c * 32;
    Isa::prefetch(p);
    weights[g] = Isa::decode(p, table);
    scale[g] = Isa::set1(w.absmax[(flat + c * 64 + g * w.in) >> w.block_shift] * w.inv_scale);
  }
  const std::byte* xc = x + c * R * kChunkBytes;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const typename Isa::X xr = Isa::load_x(xc + r * kChunkBytes);
    const F d = Isa::load_scale(xc + r * kChunkBytes + 64);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
      acc[g][r][J] = Isa::fma(Isa::cvt(Isa::dot(weights[g], xr)), Isa::mul(d, scale[g]), acc[g][r][J]);
  }
}

template <int R, int G, int C, int... Js>
inline void q8_steps(const Q8Weight& w, const uint8_t* bytes, int64_t row_bytes, int64_t flat, int64_t c,
                     const std::byte* x, const typename Isa::Table& table, F (&acc)[G][R][C],
                     std::integer_sequence<int, Js...>) {
  (q8_step<R, G, C, Js>(w, bytes, row_bytes, flat, c + Js, x, table, acc), ...);
}

// Rows [o, o + G) of W against R rows of x; y[r * ldy + o + g] gets the sums.
template <int R, int G>
void q8_block(const Q8Weight& w, const std::byte* x, const typename Isa::Table& table, int64_t o, float* y,
              int64_t ldy) {
  constexpr int C = Isa::chains(R, G);
  F acc[G][R][C];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < C; ++j) acc[g][r][j] = Isa::zero();
  const int64_t chunks = w.in / 64, row_bytes = w.in / 2, flat = o * w.in;
  const uint8_t* bytes = w.packed + o * row_bytes;
  int64_t c = 0;
  for (; c + C <= chunks; c += C)
    q8_steps<R, G, C>(w, bytes, row_bytes, flat, c, x, table, acc, std::make_integer_sequence<int, C>());
  for (; c < chunks; ++c) q8_step<R, G, C, 0>(w, bytes, row_bytes, flat, c, x, table, acc);
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      F total = acc[g][r][0];
#pragma GCC unroll 4
      for (int j = 1; j < C; ++j) total = Isa::add(total, acc[g][r][j]);
      y[r * ldy + o + g] = Isa::sum(total);
    }
}

template <int R>
void q8_rows(const Q8Weight& w, const std::byte* x, int64_t o_begin, int64_t o_end, float* y, int64_t ldy) {
  constexpr int G = Isa::group(R);
  const typename Isa::Table table = Isa::table(w.code);
  int64_t o = o_begin;
  for (; o + G <= o_end; o += G) q8_block<R, G>(w, x, table, o, y, ldy);
  for (; o < o_end; ++o) q8_block<R, 1>(w, x, table, o, y, ldy);
}

template <int... Rs>
void q8_dispatch(int64_t rows, const Q8Weight& w, const std::byte* x, int64_t o_begin, int64_t o_end, float* y,
                 int64_t ldy, std::integer_sequence<int, Rs...>) {
  ((rows == Rs + 1 ? (q8_rows<Rs + 1>(w, x, o_begin, o_end, y, ldy), 0) : 0), ...);
}

void q8_gemv(const Q8Weight& w, const std::byte* x, int64_t rows, int64_t o_begin, int64_t o_end, float* y,
             int64_t ldy) {
  q8_dispatch(rows, w, x, o_begin, o_end, y, ldy, std::make_integer_sequence<int, Isa::kMaxRows>());
}

constexpr Matmul4Q8Ops kOps = {Isa::kMaxRows, Isa::kLanes, q8_gemv};

}  // namespace
}  // namespace halo::kernels
