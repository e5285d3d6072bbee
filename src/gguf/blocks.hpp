// Private to src/gguf: ggml's block layouts and the small integer helpers the
// reference quantizers share. Helpers are `static inline` so that a per-ISA
// translation unit that includes this header gets its own copy (no AVX code can
// leak into the scalar units through the linker's choice of an inline body).
#pragma once

#include <cstdint>
#include <cstring>

namespace halo::gguf::blocks {

constexpr int kQK = 32;    // elements per block of the 32-block types
constexpr int kQKK = 256;  // elements per super-block of the K types

struct Q4_0 { uint16_t d; uint8_t qs[16]; };
struct Q4_1 { uint16_t d, m; uint8_t qs[16]; };
struct Q5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; };
struct Q5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; };
struct Q8_0 { uint16_t d; int8_t qs[32]; };
struct Q2_K { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; };
struct Q3_K { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; };
struct Q4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; };
struct Q5_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; };
struct Q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; };
struct Q8_K { float d; int8_t qs[256]; int16_t bsums[16]; };

static_assert(sizeof(Q4_0) == 18 && sizeof(Q4_1) == 20 && sizeof(Q5_0) == 22 && sizeof(Q5_1) == 24);
static_assert(sizeof(Q8_0) == 34 && sizeof(Q2_K) == 84 && sizeof(Q3_K) == 110 && sizeof(Q4_K) == 144);
static_assert(sizeof(Q5_K) == 176 && sizeof(Q6_K) == 210 && sizeof(Q8_K) == 292);

// Below this magnitude a group counts as all zero (ggml's GROUP_MAX_EPS).
constexpr float kGroupMaxEps = 1e-15f;

static inline uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}

// Round to nearest (ties to even) by adding 1.5 * 2^23, as ggml's nearest_int
// does; exact for |value| < 2^22, and the same bits as ggml's beyond that.
static inline int nearest_int(float value) {
  const float shifted = value + 12582912.0f;
  return int(bits_of(shifted) & 0x007fffffu) - 0x00400000;
}

// float -> int32 by truncation with x86's cvttss2si result for NaN and
// out-of-range values (INT32_MIN), which is what ggml's `(int8_t)(x)` casts
// compile to; spelled out because the C++ conversion is undefined there.
static inline int32_t truncate_to_int32(float value) {
  if (!(value > -2147483648.0f && value < 2147483648.0f)) return INT32_MIN;
  return int32_t(value);
}
static inline int8_t truncate_to_int8(float value) { return int8_t(uint8_t(uint32_t(truncate_to_int32(value)))); }
static inline uint8_t truncate_to_uint8(float value) { return uint8_t(uint32_t(truncate_to_int32(value))); }

// roundf (half away from zero), then the conversion to int8 as above.
int8_t round_to_int8(float value);

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block.
static inline void scale_min_k4(int j, const uint8_t* q, uint8_t* scale, uint8_t* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = uint8_t((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *min = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

}  // namespace halo::gguf::blocks
