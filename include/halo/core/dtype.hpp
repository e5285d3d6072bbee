// Element types that cross halo's API, and exact conversions between them.
//
// Conversions are bit-exact with PyTorch and NumPy: float32 -> float16 and
// float32 -> bfloat16 round to nearest even, NaN stays NaN (bfloat16 NaN is
// the quiet 0x7fc0, as torch writes it), subnormals are kept.
#pragma once

#include <bit>
#include <cstdint>
#include <string_view>

#if defined(__CUDACC__)
#define HALO_HD __host__ __device__
#else
#define HALO_HD
#endif

namespace halo {

enum class DType : uint8_t { f32, f16, bf16 };

constexpr std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
  }
  return "?";
}

constexpr int64_t dtype_size(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

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

// Loads element i of a buffer of `dtype` as float32 (exact for every dtype).
HALO_HD inline float load_as_float(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::f32: return static_cast<const float*>(data)[i];
    case DType::f16: return f16_to_float(static_cast<const uint16_t*>(data)[i]);
    case DType::bf16: return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
  }
  return 0.0f;
}

// Stores a float32 as element i of a buffer of `dtype`, rounding to nearest even.
HALO_HD inline void store_from_float(void* data, DType dtype, int64_t i, float value) {
  switch (dtype) {
    case DType::f32: static_cast<float*>(data)[i] = value; break;
    case DType::f16: static_cast<uint16_t*>(data)[i] = float_to_f16(value); break;
    case DType::bf16: static_cast<uint16_t*>(data)[i] = float_to_bf16(value); break;
  }
}

}  // namespace halo
