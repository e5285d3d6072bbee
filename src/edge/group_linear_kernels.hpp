// Dot products for linear_4bit, one per ISA (group_linear_avx2.cpp / _avx512.cpp are
// compiled with those flags only). The scalar one in group_linear.cpp is the reference.
#pragma once

#include <cstdint>

namespace halo::edge::kernels {

float dot_avx2(const float* a, const float* b, int64_t n);
float dot_avx512(const float* a, const float* b, int64_t n);

}  // namespace halo::edge::kernels
