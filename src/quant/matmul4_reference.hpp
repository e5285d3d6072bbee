// The scalar reference of the 4-bit matmul (matmul4_scalar.cpp), for the
// dispatcher's scalar entry and for the tests. Plain C++ only.
#pragma once

#include <cstdint>

#include "src/quant/matmul4_kernels.hpp"

namespace halo::kernels {

// W[o, k] as the kernels use it: code * absmax rounded to w.precision.
float matmul4_weight(const Matmul4Weight& w, int64_t o, int64_t k);

// y[r, o] = sum_k x[r, k] W[o, k] for o in [o_begin, o_end); x [rows, in], y [rows, out] float32.
void matmul4_reference(const Matmul4Weight& w, const float* x, int64_t rows, int64_t o_begin, int64_t o_end,
                       float* y);
// y[r, k] = sum_o x[r, o] W[o, k] for k in [k_begin, k_end); x [rows, out], y [rows, in] float32.
void matmul4_transposed_reference(const Matmul4Weight& w, const float* x, int64_t rows, int64_t k_begin,
                                  int64_t k_end, float* y);

}  // namespace halo::kernels
