// Private interface between the 4-bit matmul dispatch (matmul4.cpp, plain C++)
// and its per-ISA kernels. Per-ISA translation units see only raw pointers and
// plain structs from here: threading, buffers and dtype conversions stay in
// plain code, so no inline library function is ever compiled with ISA flags
// (src/CMakeLists.txt explains why that matters).
#pragma once

#include <algorithm>
#include <cstdint>

#include "halo/core/format.hpp"
#include "halo/core/parallel.hpp"

namespace halo::kernels {

// The weight as the kernels read it.
struct Matmul4Weight {
  const uint8_t* packed;
  const float* absmax;
  const float* code;  // 16 code values
  int64_t blocksize;
  int64_t out, in;    // W is [out, in]
  Format precision;   // f32, f16 or bf16: each weight is code * absmax rounded to this
  int block_shift;    // log2(blocksize): element i is in block i >> block_shift (no division in loops)
};

// c[i, j] += sum_l a[i, l] * b[l, j] (row-major with leading dimensions): the register
// tiled float GEMM of matmul4_simd.hpp, also the LoRA layer's tile GEMM for dense bases.
using Gemm = void (*)(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                      int64_t cols, int64_t depth);

// What one CPU rung provides. The plain dispatcher builds the whole operation from these.
struct Matmul4Ops {
  // Fused decode GEMV (y = x Wᵀ for a few rows). Usable when in % 64 == 0 and blocksize >= 64.
  int gemv_max_rows;  // rows per pass
  // x32 [rows, in] float32 -> panel [in/64][rows][64] in the lane order the GEMV decodes nibbles in
  // (which may depend on the weight precision).
  void (*gemv_pack)(const float* x32, int64_t rows, int64_t in, float* panel, Format precision);
  // y[r * ldy + o] = sum_k x[r, k] W[o, k] for o in [o_begin, o_end), r < rows.
  void (*gemv)(const Matmul4Weight& w, const float* panel, int64_t rows, int64_t o_begin, int64_t o_end, float* y,
               int64_t ldy);
  // W[o, k] for o in [o0, o1), k in [k0, k1) as float32 into out[(o - o0) * ld + (k - k0)].
  void (*decode)(const Matmul4Weight& w, int64_t o0, int64_t o1, int64_t k0, int64_t k1, float* out, int64_t ld);
  Gemm gemm;
  // The same with b stored in panels kGemmPanel columns wide: column j at
  // b[(j / kGemmPanel) * panel_stride + l * kGemmPanel + j % kGemmPanel] (each panel contiguous,
  // so its rows do not crowd a few L1 sets the way a wide leading dimension does).
  Gemm gemm_panels;  // (a, lda, b, panel_stride, c, ldc, rows, cols, depth)
  // Register tile of `gemm`: rows of a, columns of b (multiples of these run without tails).
  int gemm_rows, gemm_cols;
};

// The decode GEMVs split W's rows over threads only with at least this many weights per
// thread (15-25 us of work on one core): smaller products (SmolLM2's 576 x 576 layers) run
// on the calling thread. The pool's caller runs every chunk no worker has claimed
// (core/parallel.cpp), but a worker that claimed its chunk can still lose its core to
// torch's spinning OpenMP threads between torch operations, and then the call waits for
// it (576 x 576 at 1 row in bench_matmul4 on a 2-core Zen 5, interleaved with torch:
// 0.090 ms with two threads at 2^16 weights per task, 0.03 ms on the calling thread).
inline constexpr int64_t kGemvWeightsPerTask = int64_t(1) << 18;

// Rows of W per GEMV task: one even share per thread (a multiple of 4 rows), or fewer
// tasks when the product is small.
inline int64_t gemv_grain(int64_t out, int64_t in) {
  const int64_t tasks = std::clamp<int64_t>(out * in / kGemvWeightsPerTask, 1, num_threads());
  return ((out + tasks - 1) / tasks + 3) / 4 * 4;
}

// Width of the b panels of Matmul4Ops::gemm_panels (a multiple of every ISA's register tile).
inline constexpr int64_t kGemmPanel = 32;

extern const Matmul4Ops kMatmul4Scalar;
extern const Matmul4Ops kMatmul4Avx2;
extern const Matmul4Ops kMatmul4Avx512;

// Scalar pieces the SIMD kernels call for unaligned heads and tails (out of line on purpose).
void matmul4_decode_scalar(const Matmul4Weight& w, int64_t o0, int64_t o1, int64_t k0, int64_t k1, float* out,
                           int64_t ld);
void gemm_scalar(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                 int64_t cols, int64_t depth);
// The same GEMM per ISA (one template, matmul4_simd.hpp): for users outside the matmul.
void gemm_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
               int64_t cols, int64_t depth);
void gemm_avx512(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                 int64_t cols, int64_t depth);

}  // namespace halo::kernels
