// Private interface between the AdamW8bit dispatch (adamw8bit.cpp) and the
// per-ISA kernels. Per-ISA translation units include only this header and
// xsimd, so no inline function compiled with AVX flags leaks into plain code.
#pragma once

#include <cstdint>

#include "halo/core/format.hpp"

namespace halo::kernels {

struct AdamW8bitJob {
  void* param;
  const void* grad;
  Format dtype;
  int64_t n;
  uint8_t* state1;
  uint8_t* state2;
  float* absmax1;
  float* absmax2;
  const float* code1;  // signed dynamic map
  const float* code2;  // unsigned dynamic map
  const float* mid1;   // 255 midpoints between neighbouring codes of code1
  const float* mid2;
  float lr, beta1, beta2, eps, decay_factor;  // decay_factor = 1 - lr * weight_decay
  float step_size;                            // lr / (1 - beta1^t)
  float correction2;                          // sqrt(1 - beta2^t)
  float gnorm_scale;
};

// Blocks [block_begin, block_end) of 256 elements.
void adamw8bit_scalar(const AdamW8bitJob& job, int64_t block_begin, int64_t block_end);
void adamw8bit_avx2(const AdamW8bitJob& job, int64_t block_begin, int64_t block_end);
void adamw8bit_avx512(const AdamW8bitJob& job, int64_t block_begin, int64_t block_end);

// Index of the code nearest to `value` among ascending codes with midpoints `mid`
// (an exact tie goes to the lower code): the number of midpoints below value,
// found by a branch-free binary search. Out of line so ISA units can call it.
uint8_t nearest_code(const float* mid, float value);

}  // namespace halo::kernels
