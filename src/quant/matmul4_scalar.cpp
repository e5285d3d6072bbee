// Scalar reference for the 4-bit matmul: the ground truth the SIMD kernels are
// tested against, written as plainly as possible (no blocking, no reordering):
// each output is one float32 sum over k (or o) in ascending order.
#include "halo/core/convert.hpp"
#include "halo/quant/block.hpp"
#include "src/quant/matmul4_kernels.hpp"
#include "src/quant/matmul4_reference.hpp"

namespace halo::kernels {

namespace {
float rounded(float value, Format precision) {
  switch (precision) {
    case Format::bf16: return bf16_to_float(float_to_bf16(value));
    case Format::f16: return f16_to_float(float_to_f16(value));
    default: return value;
  }
}
}  // namespace

float matmul4_weight(const Matmul4Weight& w, int64_t o, int64_t k) {
  const int64_t i = o * w.in + k;
  return rounded(w.code[code_at(w.packed, i)] * w.absmax[i / w.blocksize], w.precision);
}

void matmul4_reference(const Matmul4Weight& w, const float* x, int64_t rows, int64_t o_begin, int64_t o_end,
                       float* y) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = o_begin; o < o_end; ++o) {
      float sum = 0.0f;
      for (int64_t k = 0; k < w.in; ++k) sum += x[r * w.in + k] * matmul4_weight(w, o, k);
      y[r * w.out + o] = sum;
    }
}

void matmul4_transposed_reference(const Matmul4Weight& w, const float* x, int64_t rows, int64_t k_begin,
                                  int64_t k_end, float* y) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = k_begin; k < k_end; ++k) {
      float sum = 0.0f;
      for (int64_t o = 0; o < w.out; ++o) sum += x[r * w.out + o] * matmul4_weight(w, o, k);
      y[r * w.in + k] = sum;
    }
}

void matmul4_decode_scalar(const Matmul4Weight& w, int64_t o0, int64_t o1, int64_t k0, int64_t k1, float* out,
                           int64_t ld) {
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t k = k0; k < k1; ++k) out[(o - o0) * ld + (k - k0)] = matmul4_weight(w, o, k);
}

void gemm_scalar(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
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

const Matmul4Ops kMatmul4Scalar = {0, nullptr, nullptr, matmul4_decode_scalar, gemm_scalar, nullptr, 1, 1};

}  // namespace halo::kernels
