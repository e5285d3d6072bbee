// AVX2 register-blocked GEMM for LoRA weight tiles: 6 rows x 16 columns of c in
// 12 ymm accumulators. The AVX2 translation units are built without -mfma (a
// CPU with AVX2 need not have FMA), so each step is a multiply and an add.
// Column tails use masked loads/stores, row tails smaller instantiations.
#include <immintrin.h>

#include <cstdint>

#include "gemm_kernels.hpp"

namespace halo::lora::kernels {
namespace {

__m256i lane_mask(int64_t count) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count < 0 ? 0 : count)), index);
}

// Named accumulators: GCC keeps arrays of vectors in memory inside the loop.
template <int Rows>
void micro_kernel(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t depth,
                  __m256i mask0, __m256i mask1) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float* a0 = a;
  const float* a1 = a + (Rows > 1 ? lda : 0);
  const float* a2 = a + (Rows > 2 ? 2 * lda : 0);
  const float* a3 = a + (Rows > 3 ? 3 * lda : 0);
  const float* a4 = a + (Rows > 4 ? 4 * lda : 0);
  const float* a5 = a + (Rows > 5 ? 5 * lda : 0);
  for (int64_t l = 0; l < depth; ++l) {
    const __m256 b0 = _mm256_maskload_ps(b + l * ldb, mask0);
    const __m256 b1 = _mm256_maskload_ps(b + l * ldb + 8, mask1);
    __m256 av = _mm256_broadcast_ss(a0 + l);
    c00 = _mm256_add_ps(c00, _mm256_mul_ps(av, b0));
    c01 = _mm256_add_ps(c01, _mm256_mul_ps(av, b1));
    if constexpr (Rows > 1) {
      av = _mm256_broadcast_ss(a1 + l);
      c10 = _mm256_add_ps(c10, _mm256_mul_ps(av, b0));
      c11 = _mm256_add_ps(c11, _mm256_mul_ps(av, b1));
    }
    if constexpr (Rows > 2) {
      av = _mm256_broadcast_ss(a2 + l);
      c20 = _mm256_add_ps(c20, _mm256_mul_ps(av, b0));
      c21 = _mm256_add_ps(c21, _mm256_mul_ps(av, b1));
    }
    if constexpr (Rows > 3) {
      av = _mm256_broadcast_ss(a3 + l);
      c30 = _mm256_add_ps(c30, _mm256_mul_ps(av, b0));
      c31 = _mm256_add_ps(c31, _mm256_mul_ps(av, b1));
    }
    if constexpr (Rows > 4) {
      av = _mm256_broadcast_ss(a4 + l);
      c40 = _mm256_add_ps(c40, _mm256_mul_ps(av, b0));
      c41 = _mm256_add_ps(c41, _mm256_mul_ps(av, b1));
    }
    if constexpr (Rows > 5) {
      av = _mm256_broadcast_ss(a5 + l);
      c50 = _mm256_add_ps(c50, _mm256_mul_ps(av, b0));
      c51 = _mm256_add_ps(c51, _mm256_mul_ps(av, b1));
    }
  }
  const __m256 accumulators[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < Rows; ++r) {
    float* row = c + r * ldc;
    _mm256_maskstore_ps(row, mask0, _mm256_add_ps(_mm256_maskload_ps(row, mask0), accumulators[r][0]));
    _mm256_maskstore_ps(row + 8, mask1, _mm256_add_ps(_mm256_maskload_ps(row + 8, mask1), accumulators[r][1]));
  }
}

}  // namespace

void gemm_nn_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                  int64_t cols, int64_t depth) {
  for (int64_t i = 0; i < rows; i += 6) {
    const int64_t height = rows - i < 6 ? rows - i : 6;
    const float* ai = a + i * lda;
    for (int64_t j = 0; j < cols; j += 16) {
      const int64_t width = cols - j < 16 ? cols - j : 16;
      const __m256i mask0 = lane_mask(width), mask1 = lane_mask(width - 8);
      float* cij = c + i * ldc + j;
      switch (height) {
        case 6: micro_kernel<6>(ai, lda, b + j, ldb, cij, ldc, depth, mask0, mask1); break;
        case 5: micro_kernel<5>(ai, lda, b + j, ldb, cij, ldc, depth, mask0, mask1); break;
        case 4: micro_kernel<4>(ai, lda, b + j, ldb, cij, ldc, depth, mask0, mask1); break;
        case 3: micro_kernel<3>(ai, lda, b + j, ldb, cij, ldc, depth, mask0, mask1); break;
        case 2: micro_kernel<2>(ai, lda, b + j, ldb, cij, ldc, depth, mask0, mask1); break;
        default: micro_kernel<1>(ai, lda, b + j, ldb, cij, ldc, depth, mask0, mask1); break;
      }
    }
  }
}

}  // namespace halo::lora::kernels
