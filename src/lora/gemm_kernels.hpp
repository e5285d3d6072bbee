// Tile GEMM kernels the LoRA layer runs on dequantized weight tiles:
//   c[i, j] += sum_l a[i, l] * b[l, j]      (row-major, leading dimensions given)
// b is a small tile that stays in L1/L2 while all rows of a stream past it.
// Per-ISA definitions live in gemm_avx2.cpp / gemm_avx512.cpp (compiled with those ISA flags only,
// so nothing inline is shared with plain code); gemm_scalar.cpp is the reference.
#pragma once

#include <cstdint>

namespace halo::lora::kernels {

using TileGemm = void (*)(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                         int64_t rows, int64_t cols, int64_t depth);

void gemm_nn_scalar(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                    int64_t cols, int64_t depth);
void gemm_nn_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                  int64_t cols, int64_t depth);
void gemm_nn_avx512(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                    int64_t cols, int64_t depth);

}  // namespace halo::lora::kernels
