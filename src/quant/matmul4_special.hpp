// The AVX-512 rung's extra paths for bfloat16 x: AVX512-BF16 dot products for the
// decode GEMV and AMX tiles for the GEMMs. matmul4.cpp makes them the registry
// entries "avx512-bf16" and "avx512-amx" (CpuFeature conditions), which run these for
// the shapes that fit and the plain AVX-512 kernels otherwise.
#pragma once

#include <cstdint>

#include "halo/core/format.hpp"
#include "src/quant/matmul4_kernels.hpp"

namespace halo::kernels {

// The shapes each path takes (bfloat16 x only); anything else runs the plain AVX-512 kernels.
bool bf16_gemv_fits(Format dtype, int64_t rows, int64_t in, int64_t blocksize);
bool amx_forward_fits(Format dtype, int64_t rows);

// x, bias, y bfloat16. The CPU must have AVX512-BF16 (and AMX-BF16 for the AMX paths).
void run_bf16_gemv(const void* x, int64_t rows, const Matmul4Weight& w, const void* bias, void* y);
void run_amx_forward(const void* x, int64_t rows, const Matmul4Weight& w, const void* bias, void* y);
void run_amx_transposed(const void* x, int64_t rows, const Matmul4Weight& w, void* y);

// Per-ISA pieces (matmul4_avx512bf16.cpp, matmul4_amx.cpp). Raw pointers only.
namespace bf16 {
// x [rows, in] bfloat16 bits -> panel [in/64][rows][64] in the GEMV's lane order.
void gemv_pack(const uint16_t* x, int64_t rows, int64_t in, uint16_t* panel);
// y[r * ldy + o] = sum_k x[r, k] W[o, k] (W rounded to bfloat16), rows <= kMaxRows.
inline constexpr int kMaxRows = 8;
void gemv(const Matmul4Weight& w, const uint16_t* panel, int64_t rows, int64_t o_begin, int64_t o_end, float* y,
          int64_t ldy);
}  // namespace bf16

namespace amx {
// Operands are stored as whole tiles (16 rows of 64 bytes, contiguous), so every tile
// load reads 1 KiB in a row instead of 16 rows far apart (which also thrash one L1 set).

// Chunk order: position q (0..31) of 32-wide k-step 2c + v (v = 0, 1) holds element
// 64c + chunk_element(v, q) of the row (the low nibbles of the chunk's bytes in
// positions 0-15, the high nibbles in 16-31). Used when every row starts on a whole
// 64-element chunk inside one block (K % 64 == 0, blocksize >= 64); otherwise k runs
// in natural order. The x operand is laid out to match.
constexpr int chunk_element(int v, int q) { return q < 16 ? 4 * q + 2 * v + 1 : 4 * (q - 16) + 2 * v; }

// Tile configuration of the calling thread (every AMX routine below needs it).
void configure();
void release();
// W[n0:n1, k-steps s0 .. s0+steps) as bfloat16 a tiles: panel[(s - s0) * 1024 + (n - n0) * 32 + q]
// holds the element at position q of k-step s (chunk order when chunk_order, else k = 32s + q);
// rows past n1 (at most 32 rows) and k past `in` are zero. s0 and steps are even in chunk order.
void decode_rows(const Matmul4Weight& w, int64_t n0, int64_t n1, int64_t s0, int64_t steps, bool chunk_order,
                 uint16_t* panel);
// W[o0 : o0 + 32 * steps, k0 : k0 + 64] as b tiles: panel[(j / 16) * steps * 256 + (o - o0) / 2 * 16 + j % 16]
// holds the pair (W[o, k], W[o+1, k]) as one 32-bit word (row o in the low half, o - o0 even),
// where column j is k = k0 + j, or k0 + chunk_element(j / 32, j % 32) when chunk_order (then k0
// is a multiple of 64). Rows past `out` and columns past `in` are zero.
void decode_pairs(const Matmul4Weight& w, int64_t k0, int64_t o0, int64_t steps, bool chunk_order, uint32_t* panel);
// The four 16 x 16 float32 accumulator tiles C(i, j) = (accumulate ? C(i, j) : 0) + the sum
// over `steps` k-steps of a tile i times b tile j, for i < a_tiles, j < b_tiles: a tile i of
// step s at a + s * a_step + i * a_next, b tile j at b + s * b_step + j * b_next (elements /
// 32-bit words; tiles contiguous), C(i, j) at c + i * c_next_row + j * c_next_col with rows
// c_stride floats apart.
void tile_product(const uint16_t* a, int64_t a_step, int64_t a_next, int a_tiles, const uint32_t* b, int64_t b_step,
                  int64_t b_next, int b_tiles, int64_t steps, float* c, int64_t c_stride, int64_t c_next_row,
                  int64_t c_next_col, bool accumulate);
// Tile (block, s) of x [rows, in] as b tiles: dst[p * 16 + i] holds (x[m, k], x[m, k']) for row
// m = 16 * block + i and the elements k, k' at positions 2p, 2p + 1 of k-step s (chunk order
// when chunk_order, then in % 64 == 0); rows past `rows` and k past `in` are zero.
void pair_tile(const uint16_t* x, int64_t rows, int64_t in, int64_t block, int64_t s, bool chunk_order, uint32_t* dst);
// y[m, n0 + 16 * t + j] = bfloat16(c_tile(t)[j][m % 16] + bias[n0 + 16 * t + j]) for the rows m of
// x-block `block` (m < rows) and n < n1: c holds the accumulator tiles of a weight block as
// c[((t * blocks) + block) * 256 + j * 16 + m % 16]. bias may be null.
void store_rows(const float* c, int64_t blocks, int64_t block, int64_t rows, int64_t n0, int64_t n1,
                const uint16_t* bias, uint16_t* y, int64_t ldy);
// y[m, base + e] = bfloat16(accumulator of column position q) for the 64 columns of one strip
// (4 tiles of 16 at c + u * 256, row m % 16 of each), where position q holds element e = q, or
// e = chunk_element(q / 32, q % 32) when chunk_order; only e < count is written.
void store_strip(const float* c, int64_t row_in_tile, bool chunk_order, int64_t count, uint16_t* y_row);
}  // namespace amx

}  // namespace halo::kernels
