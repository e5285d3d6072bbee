// The AVX-512 rung's extra paths for bfloat16 x, used only where the CPU has the
// instructions (checked once at run time, plain code): AVX512-BF16 dot products
// for the decode GEMV and AMX tiles for the GEMMs. matmul4.cpp calls these first
// from its avx512 entries; `false` / nullptr means "not taken here, run the plain
// AVX-512 kernels".
#pragma once

#include <cstdint>

#include "halo/core/format.hpp"
#include "src/quant/matmul4_kernels.hpp"

namespace halo::kernels {

// Whether this CPU (and OS) can run the AVX512-BF16 / AMX-BF16 kernels.
bool cpu_has_avx512_bf16();
bool cpu_has_amx_bf16();

bool special_forward(const void* x, Format dtype, int64_t rows, const Matmul4Weight& w, const void* bias, void* y);
bool special_transposed(const void* x, Format dtype, int64_t rows, const Matmul4Weight& w, void* y);
// "avx512-bf16" / "avx512-amx" when special_* would take the call, else nullptr.
const char* special_variant(Format dtype, int64_t rows, int64_t in, int64_t out, int64_t blocksize, bool transposed);

// Per-ISA pieces (matmul4_avx512bf16.cpp, matmul4_amx.cpp). Raw pointers only.
namespace bf16 {
// x [rows, in] bfloat16 bits -> panel [in/64][rows][64] in the GEMV's lane order.
void gemv_pack(const uint16_t* x, int64_t rows, int64_t in, uint16_t* panel);
// y[r * ldy + o] = sum_k x[r, k] W[o, k] (W rounded to bfloat16), rows <= 16.
void gemv(const Matmul4Weight& w, const uint16_t* panel, int64_t rows, int64_t o_begin, int64_t o_end, float* y,
          int64_t ldy);
}  // namespace bf16

namespace amx {
// Tile configuration of the calling thread (every AMX routine below needs it).
void configure();
void release();
// W[n0:n1, 0:in] as bfloat16 into panel [32][depth] (rows n1-n0..31 and columns in..depth-1 zero);
// depth is `in` rounded up to 32.
void decode_rows(const Matmul4Weight& w, int64_t n0, int64_t n1, int64_t depth, uint16_t* panel);
// W[0:out, k0:k0+64] as the AMX b operand: panel[(o/2) * 64 + (k-k0)] holds the pair
// (W[o, k], W[o+1, k]) as one 32-bit word; rows past `out`, columns past `in` zero.
void decode_pairs(const Matmul4Weight& w, int64_t k0, int64_t pair_rows, uint32_t* panel);
// c[32][32] (float32, row stride 32) = a[0:32, 0:depth] . b, where a is bfloat16 rows of
// stride lda (elements) and b is `depth / 2` rows of 32-bit pairs with stride ldb (words),
// columns [0, 16 * b_tiles). depth is a multiple of 32; a_tiles, b_tiles in {1, 2}.
void tile_product(const uint16_t* a, int64_t lda, int a_tiles, const uint32_t* b, int64_t ldb, int b_tiles,
                  int64_t depth, float* c);
}  // namespace amx

}  // namespace halo::kernels
