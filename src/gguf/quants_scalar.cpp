// Scalar reference row conversions of ggml's 32-element block types (Q4_0,
// Q4_1, Q5_0, Q5_1, Q8_0) and of F16/BF16 with ggml's rounding. Each quantizer
// follows the float32 operation order of ggml's reference quantizer; the build
// uses -ffp-contract=off, so no multiply-add is fused.
#include <cmath>
#include <cstring>

#include "halo/core/convert.hpp"
#include "halo/gguf/quants.hpp"
#include "src/gguf/blocks.hpp"

namespace halo::gguf {

using namespace blocks;

namespace blocks {
int8_t round_to_int8(float value) { return truncate_to_int8(std::roundf(value)); }
}  // namespace blocks

uint16_t fp32_to_fp16(float value) {
  const uint32_t bits = bits_of(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t(((bits >> 16) & 0x8000u) | 0x7e00u);
  return float_to_f16(value);  // round to nearest even, overflow to inf, subnormals kept
}

float fp16_to_fp32(uint16_t half) { return f16_to_float(half); }

uint16_t fp32_to_bf16(float value) {
  const uint32_t bits = bits_of(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 64u);  // quiet, payload kept
  return uint16_t((bits + (0x7fffu + ((bits >> 16) & 1u))) >> 16);
}

float bf16_to_fp32(uint16_t bits) { return bf16_to_float(bits); }

void to_float_f16(const void* blocks, float* out, int64_t n) {
  const auto* in = static_cast<const uint16_t*>(blocks);
  for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_fp32(in[i]);
}

void from_float_f16(const float* in, void* blocks, int64_t n) {
  auto* out = static_cast<uint16_t*>(blocks);
  for (int64_t i = 0; i < n; ++i) out[i] = fp32_to_fp16(in[i]);
}

void to_float_bf16(const void* blocks, float* out, int64_t n) {
  const auto* in = static_cast<const uint16_t*>(blocks);
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_fp32(in[i]);
}

void from_float_bf16(const float* in, void* blocks, int64_t n) {
  auto* out = static_cast<uint16_t*>(blocks);
  for (int64_t i = 0; i < n; ++i) out[i] = fp32_to_bf16(in[i]);
}

// ---------------------------------------------------------------- quantize

namespace {

// The value of largest magnitude in one 32-element block, the first one on ties (Q4_0, Q5_0).
float largest_magnitude(const float* x) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < kQK; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  return max;
}

}  // namespace

// Q4_0: d = (the value of largest magnitude, first one on ties) / -8,
// q = min(15, trunc(x / d + 8.5)); element j low nibble, j + 16 high nibble.
void from_float_q4_0(const float* in, void* out, int64_t n) {
  auto* y = static_cast<Q4_0*>(out);
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* x = in + b * kQK;
    const float max = largest_magnitude(x);
    const float d = max / -8;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    for (int j = 0; j < kQK / 2; ++j) {
      const int q0 = truncate_to_int8(x[j] * id + 8.5f);
      const int q1 = truncate_to_int8(x[j + kQK / 2] * id + 8.5f);
      y[b].qs[j] = uint8_t((q0 < 15 ? q0 : 15) | ((q1 < 15 ? q1 : 15) << 4));
    }
  }
}

// Q4_1: d = (max - min) / 15, m = min, q = min(15, trunc((x - min) / d + 0.5)).
void from_float_q4_1(const float* in, void* out, int64_t n) {
  auto* y = static_cast<Q4_1*>(out);
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* x = in + b * kQK;
    float min = 3.402823466e+38f, max = -3.402823466e+38f;
    for (int j = 0; j < kQK; ++j) {
      if (x[j] < min) min = x[j];
      if (x[j] > max) max = x[j];
    }
    const float d = (max - min) / 15;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    y[b].m = fp32_to_fp16(min);
    for (int j = 0; j < kQK / 2; ++j) {
      const int q0 = truncate_to_int8((x[j] - min) * id + 0.5f);
      const int q1 = truncate_to_int8((x[j + kQK / 2] - min) * id + 0.5f);
      y[b].qs[j] = uint8_t((q0 < 15 ? q0 : 15) | ((q1 < 15 ? q1 : 15) << 4));
    }
  }
}

// Q5_0: as Q4_0 with d = max / -16 and 5-bit codes; the fifth bits go to qh.
void from_float_q5_0(const float* in, void* out, int64_t n) {
  auto* y = static_cast<Q5_0*>(out);
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* x = in + b * kQK;
    const float max = largest_magnitude(x);
    const float d = max / -16;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    uint32_t qh = 0;
    for (int j = 0; j < kQK / 2; ++j) {
      const int t0 = truncate_to_int8(x[j] * id + 16.5f);
      const int t1 = truncate_to_int8(x[j + kQK / 2] * id + 16.5f);
      const uint8_t q0 = uint8_t(t0 < 31 ? t0 : 31);
      const uint8_t q1 = uint8_t(t1 < 31 ? t1 : 31);
      y[b].qs[j] = uint8_t((q0 & 0x0F) | ((q1 & 0x0F) << 4));
      qh |= uint32_t((q0 & 0x10u) >> 4) << j;
      qh |= uint32_t((q1 & 0x10u) >> 4) << (j + kQK / 2);
    }
    std::memcpy(y[b].qh, &qh, 4);
  }
}

// Q5_1: as Q4_1 with d = (max - min) / 31 and 5-bit codes (no clamp, as in ggml).
void from_float_q5_1(const float* in, void* out, int64_t n) {
  auto* y = static_cast<Q5_1*>(out);
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* x = in + b * kQK;
    float min = 3.402823466e+38f, max = -3.402823466e+38f;
    for (int j = 0; j < kQK; ++j) {
      if (x[j] < min) min = x[j];
      if (x[j] > max) max = x[j];
    }
    const float d = (max - min) / 31;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    y[b].m = fp32_to_fp16(min);
    uint32_t qh = 0;
    for (int j = 0; j < kQK / 2; ++j) {
      const uint8_t q0 = truncate_to_uint8((x[j] - min) * id + 0.5f);
      const uint8_t q1 = truncate_to_uint8((x[j + kQK / 2] - min) * id + 0.5f);
      y[b].qs[j] = uint8_t((q0 & 0x0F) | ((q1 & 0x0F) << 4));
      qh |= uint32_t((q0 & 0x10u) >> 4) << j;
      qh |= uint32_t((q1 & 0x10u) >> 4) << (j + kQK / 2);
    }
    std::memcpy(y[b].qh, &qh, 4);
  }
}

// Q8_0: d = amax / 127, q = roundf(x / d) (half away from zero).
void from_float_q8_0(const float* in, void* out, int64_t n) {
  auto* y = static_cast<Q8_0*>(out);
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* x = in + b * kQK;
    float amax = 0.0f;
    for (int j = 0; j < kQK; ++j) amax = amax > std::fabs(x[j]) ? amax : std::fabs(x[j]);  // ggml's MAX(a, b)
    const float d = amax / 127;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    for (int j = 0; j < kQK; ++j) y[b].qs[j] = round_to_int8(x[j] * id);
  }
}

// ---------------------------------------------------------------- dequantize

void to_float_q4_0(const void* in, float* out, int64_t n) {
  const auto* x = static_cast<const Q4_0*>(in);
  for (int64_t b = 0; b < n / kQK; ++b, out += kQK) {
    const float d = fp16_to_fp32(x[b].d);
    for (int j = 0; j < kQK / 2; ++j) {
      out[j] = float((x[b].qs[j] & 0x0F) - 8) * d;
      out[j + kQK / 2] = float((x[b].qs[j] >> 4) - 8) * d;
    }
  }
}

void to_float_q4_1(const void* in, float* out, int64_t n) {
  const auto* x = static_cast<const Q4_1*>(in);
  for (int64_t b = 0; b < n / kQK; ++b, out += kQK) {
    const float d = fp16_to_fp32(x[b].d), m = fp16_to_fp32(x[b].m);
    for (int j = 0; j < kQK / 2; ++j) {
      out[j] = float(x[b].qs[j] & 0x0F) * d + m;
      out[j + kQK / 2] = float(x[b].qs[j] >> 4) * d + m;
    }
  }
}

void to_float_q5_0(const void* in, float* out, int64_t n) {
  const auto* x = static_cast<const Q5_0*>(in);
  for (int64_t b = 0; b < n / kQK; ++b, out += kQK) {
    const float d = fp16_to_fp32(x[b].d);
    uint32_t qh;
    std::memcpy(&qh, x[b].qh, 4);
    for (int j = 0; j < kQK / 2; ++j) {
      const int high0 = int(((qh >> j) << 4) & 0x10u);
      const int high1 = int((qh >> (j + 12)) & 0x10u);
      out[j] = float(((x[b].qs[j] & 0x0F) | high0) - 16) * d;
      out[j + kQK / 2] = float(((x[b].qs[j] >> 4) | high1) - 16) * d;
    }
  }
}

void to_float_q5_1(const void* in, float* out, int64_t n) {
  const auto* x = static_cast<const Q5_1*>(in);
  for (int64_t b = 0; b < n / kQK; ++b, out += kQK) {
    const float d = fp16_to_fp32(x[b].d), m = fp16_to_fp32(x[b].m);
    uint32_t qh;
    std::memcpy(&qh, x[b].qh, 4);
    for (int j = 0; j < kQK / 2; ++j) {
      const int high0 = int(((qh >> j) << 4) & 0x10u);
      const int high1 = int((qh >> (j + 12)) & 0x10u);
      out[j] = float((x[b].qs[j] & 0x0F) | high0) * d + m;
      out[j + kQK / 2] = float((x[b].qs[j] >> 4) | high1) * d + m;
    }
  }
}

void to_float_q8_0(const void* in, float* out, int64_t n) {
  const auto* x = static_cast<const Q8_0*>(in);
  for (int64_t b = 0; b < n / kQK; ++b, out += kQK) {
    const float d = fp16_to_fp32(x[b].d);
    for (int j = 0; j < kQK; ++j) out[j] = float(x[b].qs[j]) * d;
  }
}

}  // namespace halo::gguf
