// AVX-512 register-blocked GEMM for LoRA weight tiles: 6 rows x 32 columns of c
// in 12 zmm accumulators; each step broadcasts one a value per row and loads
// two vectors of b. Column tails use masked loads/stores, row tails a smaller
// instantiation of the same micro-kernel.
#include <immintrin.h>

#include <cstdint>

#include "gemm_kernels.hpp"

namespace halo::lora::kernels {
namespace {

// Named accumulators (not arrays): GCC keeps arrays of __m512 in memory
// inside the loop, which halves the speed.
template <int Rows>
void micro_kernel(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t depth,
                  __mmask16 mask0, __mmask16 mask1) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float* a0 = a;
  const float* a1 = a + (Rows > 1 ? lda : 0);
  const float* a2 = a + (Rows > 2 ? 2 * lda : 0);
  const float* a3 = a + (Rows > 3 ? 3 * lda : 0);
  const float* a4 = a + (Rows > 4 ? 4 * lda : 0);
  const float* a5 = a + (Rows > 5 ? 5 * lda : 0);
  for (int64_t l = 0; l < depth; ++l) {
    const __m512 b0 = _mm512_maskz_loadu_ps(mask0, b + l * ldb);
    const __m512 b1 = _mm512_maskz_loadu_ps(mask1, b + l * ldb + 16);
    __m512 av = _mm512_set1_ps(a0[l]);
    c00 = _mm512_fmadd_ps(av, b0, c00);
    c01 = _mm512_fmadd_ps(av, b1, c01);
    if constexpr (Rows > 1) {
      av = _mm512_set1_ps(a1[l]);
      c10 = _mm512_fmadd_ps(av, b0, c10);
      c11 = _mm512_fmadd_ps(av, b1, c11);
    }
    if constexpr (Rows > 2) {
      av = _mm512_set1_ps(a2[l]);
      c20 = _mm512_fmadd_ps(av, b0, c20);
      c21 = _mm512_fmadd_ps(av, b1, c21);
    }
    if constexpr (Rows > 3) {
      av = _mm512_set1_ps(a3[l]);
      c30 = _mm512_fmadd_ps(av, b0, c30);
      c31 = _mm512_fmadd_ps(av, b1, c31);
    }
    if constexpr (Rows > 4) {
      av = _mm512_set1_ps(a4[l]);
      c40 = _mm512_fmadd_ps(av, b0, c40);
      c41 = _mm512_fmadd_ps(av, b1, c41);
    }
    if constexpr (Rows > 5) {
      av = _mm512_set1_ps(a5[l]);
      c50 = _mm512_fmadd_ps(av, b0, c50);
      c51 = _mm512_fmadd_ps(av, b1, c51);
    }
  }
  const __m512 accumulators[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < Rows; ++r) {
    float* row = c + r * ldc;
    _mm512_mask_storeu_ps(row, mask0, _mm512_add_ps(_mm512_maskz_loadu_ps(mask0, row), accumulators[r][0]));
    _mm512_mask_storeu_ps(row + 16, mask1,
                          _mm512_add_ps(_mm512_maskz_loadu_ps(mask1, row + 16), accumulators[r][1]));
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
  // Row blocks outside, column panels inside: the 6 rows of a stay in L1 while
  // the panels of the (L2-resident) tile b pass under them.
  for (int64_t i = 0; i < rows; i += 6) {
    const int64_t height = rows - i < 6 ? rows - i : 6;
    const float* ai = a + i * lda;
    for (int64_t j = 0; j < cols; j += 32) {
      const int64_t width = cols - j < 32 ? cols - j : 32;
      const __mmask16 mask0 = lanes(width), mask1 = lanes(width - 16);
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
