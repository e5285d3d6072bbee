// AVX-512 register-blocked GEMM for LoRA weight tiles: 6 rows x 32 columns of c
// in 12 zmm accumulators; each step broadcasts one a value per row and loads
// two vectors of b. Column tails use masked loads/stores, row tails a smaller
// instantiation of the same micro-kernel.
#include <immintrin.h>

#include <cstdint>

#include "gemm_kernels.hpp"

namespace halo::lora::kernels {
namespace {

template <int Rows>
void micro_kernel(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t depth,
                  __mmask16 mask0, __mmask16 mask1) {
  __m512 acc0[Rows], acc1[Rows];
  for (int r = 0; r < Rows; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t l = 0; l < depth; ++l) {
    const __m512 b0 = _mm512_maskz_loadu_ps(mask0, b + l * ldb);
    const __m512 b1 = _mm512_maskz_loadu_ps(mask1, b + l * ldb + 16);
    for (int r = 0; r < Rows; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + l]);
      acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    float* row = c + r * ldc;
    _mm512_mask_storeu_ps(row, mask0, _mm512_add_ps(_mm512_maskz_loadu_ps(mask0, row), acc0[r]));
    _mm512_mask_storeu_ps(row + 16, mask1, _mm512_add_ps(_mm512_maskz_loadu_ps(mask1, row + 16), acc1[r]));
  }
}

__mmask16 lanes(int64_t count) {
  if (count <= 0) return 0;
  if (count >= 16) return 0xFFFF;
  return static_cast<__mmask16>((1u << count) - 1u);
}

}  // namespace

void gemm_nn_avx512(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                    int64_t cols, int64_t depth) {
  for (int64_t j = 0; j < cols; j += 32) {
    const int64_t width = cols - j < 32 ? cols - j : 32;
    const __mmask16 mask0 = lanes(width), mask1 = lanes(width - 16);
    int64_t i = 0;
    for (; i + 6 <= rows; i += 6) micro_kernel<6>(a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc, depth, mask0, mask1);
    const float* ai = a + i * lda;
    float* ci = c + i * ldc + j;
    switch (rows - i) {
      case 5: micro_kernel<5>(ai, lda, b + j, ldb, ci, ldc, depth, mask0, mask1); break;
      case 4: micro_kernel<4>(ai, lda, b + j, ldb, ci, ldc, depth, mask0, mask1); break;
      case 3: micro_kernel<3>(ai, lda, b + j, ldb, ci, ldc, depth, mask0, mask1); break;
      case 2: micro_kernel<2>(ai, lda, b + j, ldb, ci, ldc, depth, mask0, mask1); break;
      case 1: micro_kernel<1>(ai, lda, b + j, ldb, ci, ldc, depth, mask0, mask1); break;
      default: break;
    }
  }
}

}  // namespace halo::lora::kernels
