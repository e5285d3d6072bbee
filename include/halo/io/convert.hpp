// Element-wise conversions between the floating-point safetensors dtypes (F32,
// F16, BF16, F64) and float32, for tools that work on float32 copies of
// checkpoint tensors (the streaming merge). Multi-threaded (parallel_for):
// NumPy has no bfloat16 and its casts are single-threaded.
//
// Rounding: to F16 and BF16 round to nearest even (NaN stays NaN, as in
// halo/core/dtype.hpp, bit-exact with torch); F64 -> F32 rounds as a C cast.
#pragma once

#include <cstdint>

#include "halo/io/safetensors.hpp"

namespace halo::io {

// True for F32, F16, BF16 and F64.
bool is_float_dtype(StDType dtype);

// dst[i] = src[i] as float32, for `count` elements of `dtype`. InvalidArgument for
// a dtype that is not F32/F16/BF16/F64 or a negative count. dst must not overlap src.
void convert_to_float32(const void* src, StDType dtype, int64_t count, float* dst);

// dst[i] = src[i] stored as `dtype` (F32/F16/BF16/F64). dst must not overlap src.
void convert_from_float32(const float* src, int64_t count, StDType dtype, void* dst);

}  // namespace halo::io
