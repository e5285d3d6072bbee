// Exact conversions between the float element formats halo's kernels read and
// write (float32, float16, bfloat16), usable on the host and in CUDA kernels.
//
// Conversions are bit-exact with PyTorch and NumPy: float32 -> float16 and
// float32 -> bfloat16 round to nearest even, NaN stays NaN (bfloat16 NaN is
// the quiet 0x7fc0, as torch writes it), subnormals are kept.
#pragma once

#include <bit>
#include <cstdint>

#include "halo/core/format.hpp"

#if defined(__CUDACC__)
#define HALO_HD __host__ __device__
#else
#define HALO_HD
#endif

namespace halo {

HALO_HD inline uint32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  return std::bit_cast<uint32_t>(value);
#endif
}

HALO_HD inline float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  return std::bit_cast<float>(bits);
#endif
}

HALO_HD inline float bf16_to_float(uint16_t bits) { return bits_float(uint32_t(bits) << 16); }

HALO_HD inline uint16_t float_to_bf16(float value) {
  uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN, as torch writes it
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t((bits + rounding) >> 16);
}

HALO_HD inline float f16_to_float(uint16_t half) {
  uint32_t sign = uint32_t(half & 0x8000u) << 16;
  uint32_t exponent = (half >> 10) & 0x1fu;
  uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    // Subnormal half: value = mantissa * 2^-24, exact in float.
    float magnitude = float(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

HALO_HD inline uint16_t float_to_f16(float value) {
  uint32_t bits = float_bits(value);
  uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));  // NaN
  if (magnitude >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to inf (or is inf)
  if (magnitude < 0x38800000u) {
    // Result is subnormal (or zero): round magnitude * 2^24 to an integer, ties to even.
    if (magnitude < 0x33000000u) return sign;  // below half of the smallest subnormal
    uint32_t shift = 126u - (magnitude >> 23);  // 14..24 + 1
    uint32_t full = (magnitude & 0x7fffffu) | 0x800000u;
    uint32_t kept = full >> shift;
    uint32_t rest = full & ((1u << shift) - 1u);
    uint32_t half_point = 1u << (shift - 1u);
    if (rest > half_point || (rest == half_point && (kept & 1u))) ++kept;
    return uint16_t(sign | kept);
  }
  uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
}

// Loads element i of a float32/float16/bfloat16 buffer as float32 (exact). Callers
// check the format first (is_kernel_float); other formats read as 0.
HALO_HD inline float load_as_float(const void* data, Format dtype, int64_t i) {
  switch (dtype) {
    case Format::f32: return static_cast<const float*>(data)[i];
    case Format::f16: return f16_to_float(static_cast<const uint16_t*>(data)[i]);
    case Format::bf16: return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
    default: return 0.0f;
  }
}

// Stores a float32 as element i of a float32/float16/bfloat16 buffer, rounding to nearest even.
HALO_HD inline void store_from_float(void* data, Format dtype, int64_t i, float value) {
  switch (dtype) {
    case Format::f32: static_cast<float*>(data)[i] = value; break;
    case Format::f16: static_cast<uint16_t*>(data)[i] = float_to_f16(value); break;
    case Format::bf16: static_cast<uint16_t*>(data)[i] = float_to_bf16(value); break;
    default: break;
  }
}

}  // namespace halo
