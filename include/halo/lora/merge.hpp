// LoRA merge arithmetic on float32 row-major buffers:
//   W += scaling * (B @ A)            W is [out, in], A is [r, in], B is [out, r]
//   W += scaling * (B @ A)^T          with fan_in_fan_out (GPT-2 Conv1D: W is [in, out])
// `subtract` unmerges. The delta is formed in float32 as PEFT does on the CPU
// (delta = (B @ A) * scaling, then W + delta), so results match PEFT's merge to
// float32 rounding of the matrix product.
#pragma once

#include <cstdint>

#include "halo/core/format.hpp"

namespace halo::lora {

void merge_inplace(float* weight, int64_t out_features, int64_t in_features, const float* lora_a,
                   const float* lora_b, int64_t rank, float scaling, bool fan_in_fan_out, bool subtract = false);

// delta[out, in] (or [in, out] with fan_in_fan_out) = (B @ A) * scaling.
void delta_weight(float* delta, int64_t out_features, int64_t in_features, const float* lora_a, const float* lora_b,
                  int64_t rank, float scaling, bool fan_in_fan_out);

// out = W +/- scaling * (B @ A) for a float32, float16 or bfloat16 W of `dtype`
// (out may be W itself). Half-precision weights follow PEFT on the CPU: the delta
// is formed in float32 and rounded to W's dtype, then W +/- delta is computed in
// float32 and rounded once, so results equal merge_and_unload bit for bit.
void merge_weight(const void* weight, Format dtype, void* out, int64_t out_features, int64_t in_features,
                  const float* lora_a, const float* lora_b, int64_t rank, float scaling, bool fan_in_fan_out,
                  bool subtract);

}  // namespace halo::lora
