// Scalar reference tile GEMM, c += a b, in the order the SIMD kernels are tested
// against: for each row of c, accumulate a[i, l] * b[l, :] over l.
#include "gemm_kernels.hpp"

namespace halo::lora::kernels {

void gemm_nn_scalar(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                    int64_t cols, int64_t depth) {
  for (int64_t i = 0; i < rows; ++i) {
    float* c_row = c + i * ldc;
    for (int64_t l = 0; l < depth; ++l) {
      const float a_il = a[i * lda + l];
      const float* b_row = b + l * ldb;
      for (int64_t j = 0; j < cols; ++j) c_row[j] += a_il * b_row[j];
    }
  }
}

}  // namespace halo::lora::kernels
