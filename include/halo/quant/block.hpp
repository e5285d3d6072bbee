// Per-block 4-bit logic shared by the scalar reference, the SIMD kernels (for
// their tails) and the CUDA kernels (HALO_HD = __host__ __device__), so the GPU
// arithmetic is tested on the CPU.
//
// The operation order is bitsandbytes' (0.50, CPU reference path):
//   absmax  = max |x| over the block (NaN propagates),
//   scaled  = x * (1 / max(absmax, 1e-38))   for full blocks,
//           = x / max(absmax, 1e-38)         for the short last block,
//   code    = bucket of `scaled` among the format's thresholds,
//   stored absmax: as found for full blocks, max(absmax, 1e-38) for the short
//   last block (bitsandbytes clamps only there).
// Dequantized value = code value * absmax, rounded once to the output dtype.
#pragma once

#include <cstdint>

#include "halo/core/convert.hpp"
#include "halo/quant/codebook4.hpp"

namespace halo {

inline constexpr float kAbsmaxFloor = 1e-38f;

HALO_HD inline bool is_nan(float v) { return v != v; }

// Bucket of a scaled value: how many thresholds it exceeds; NaN -> 15.
HALO_HD inline uint8_t rank4(const Codebook4& format, float scaled) {
  if (is_nan(scaled)) return 15;
  uint8_t rank = 0;
  for (int i = 0; i < 15; ++i) rank += scaled > format.thresholds[i] ? 1 : 0;
  return rank;
}

HALO_HD inline uint8_t encode4(const Codebook4& format, float scaled) { return format.code_of_rank[rank4(format, scaled)]; }

// max |x| with NaN propagation (torch.max semantics).
HALO_HD inline float absmax_of(const void* input, Format dtype, int64_t begin, int64_t end) {
  float best = 0.0f;
  bool nan = false;
  for (int64_t i = begin; i < end; ++i) {
    float v = load_as_float(input, dtype, i);
    nan |= is_nan(v);
    v = v < 0.0f ? -v : v;
    best = v > best ? v : best;
  }
  return nan ? bits_float(0x7fc00000u) : best;
}

HALO_HD inline float floored(float absmax) { return absmax > kAbsmaxFloor || is_nan(absmax) ? absmax : kAbsmaxFloor; }

// Quantizes elements [begin, end) of one block. `begin` is even (blocks start
// at multiples of an even block size); an odd `end` is the tensor's last
// element and its pair is padded with the code of 0.
HALO_HD inline void quantize4_block(const Codebook4& format, const void* input, Format dtype, int64_t begin,
                                    int64_t end, bool short_block, uint8_t* packed, float* absmax_slot) {
  const float found = absmax_of(input, dtype, begin, end);
  const float floor = floored(found);
  const float inverse = 1.0f / floor;
  *absmax_slot = short_block ? floor : found;
  for (int64_t i = begin; i < end; i += 2) {
    float a = load_as_float(input, dtype, i);
    float b = i + 1 < end ? load_as_float(input, dtype, i + 1) : 0.0f;
    float sa = short_block ? a / floor : a * inverse;
    float sb = i + 1 < end ? (short_block ? b / floor : b * inverse) : 0.0f;
    packed[i / 2] = uint8_t((encode4(format, sa) << 4) | encode4(format, sb));
  }
}

// Element i of a packed 4-bit tensor (first element of a pair in the high nibble).
HALO_HD inline uint8_t code_at(const uint8_t* packed, int64_t i) {
  uint8_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 0x0f) : (byte >> 4);
}

HALO_HD inline float dequantize4_value(const Codebook4& format, const uint8_t* packed, const float* absmax,
                                       int64_t blocksize, int64_t i) {
  return format.code[code_at(packed, i)] * absmax[i / blocksize];
}

}  // namespace halo
