// Body of the SIMD kernels of ggml's 32-element block types (Q8_0, Q4_0, Q5_0),
// included by one translation unit per ISA after it defines `Isa` with:
//   using arch = xsimd::<tag>;
//   static float hmax(fb)                          largest lane (no NaN)
//   static int first_equal(fb v, float value)       index of the first lane == value, or -1
//   static void store_i8(ib v, int8_t* out)         lanes narrowed to bytes (values fit)
//   static uint32_t bit4_mask(ib v)                 bit i = bit 4 of lane i
//
// Block scales: the maximum (or the value of largest magnitude) is exact in any
// order, the scale and its reciprocal are the reference's scalar expressions,
// and the per-element steps (multiply, add, round or truncate) are the same IEEE
// operations in lanes. Blocks holding a NaN or an infinity go to the scalar rows.
#pragma once

namespace halo::gguf::kernels {
namespace {

using fb = xsimd::batch<float, Isa::arch>;
using ib = xsimd::batch<int32_t, Isa::arch>;
constexpr int kW = int(fb::size);
constexpr int kVecs = 32 / kW;  // vectors per block

inline bool block_finite(const fb* v) {
  auto bad = xsimd::isnan(v[0] - v[0]);
  for (int k = 1; k < kVecs; ++k) bad = bad | xsimd::isnan(v[k] - v[k]);
  return !xsimd::any(bad);
}

inline float block_absmax(const fb* v) {
  fb m = xsimd::abs(v[0]);
  for (int k = 1; k < kVecs; ++k) m = xsimd::max(m, xsimd::abs(v[k]));
  return Isa::hmax(m);
}

// The first element of largest magnitude, signed (ggml's `if (amax < fabsf(v))` scan).
inline float block_signed_max(const fb* v, const float* x) {
  const float amax = block_absmax(v);
  if (amax == 0.0f) return 0.0f;  // the reference keeps its +0 start value (never a -0 element)
  for (int k = 0; k < kVecs; ++k) {
    const int lane = Isa::first_equal(xsimd::abs(v[k]), amax);
    if (lane >= 0) return x[k * kW + lane];
  }
  return 0.0f;  // all zero
}

void quantize_q8_0(const float* in, void* out, int64_t blocks) {
  auto* y = static_cast<blocks::Q8_0*>(out);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* x = in + b * 32;
    fb v[kVecs];
    for (int k = 0; k < kVecs; ++k) v[k] = fb::load_unaligned(x + k * kW);
    if (!block_finite(v)) {
      from_float_q8_0(x, &y[b], 32);
      continue;
    }
    const float amax = block_absmax(v);
    const float d = amax / 127;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    for (int k = 0; k < kVecs; ++k) {
      // roundf: truncate, then step away from zero when the dropped part is at least one half.
      const fb s = v[k] * fb(id);
      const fb t = xsimd::trunc(s);
      const fb step = xsimd::select(xsimd::abs(s - t) >= fb(0.5f), xsimd::select(s < fb(0.0f), fb(-1.0f), fb(1.0f)),
                                    fb(0.0f));
      Isa::store_i8(xsimd::to_int(t + step), y[b].qs + k * kW);
    }
  }
}

// Q4_0 (Nmax 15, offset 8.5) and Q5_0 (Nmax 31, offset 16.5): codes min(Nmax, trunc(x / d + offset)).
template <int Nmax>
void quantize_q_0(const float* in, void* out, int64_t blocks) {
  constexpr float offset = Nmax == 15 ? 8.5f : 16.5f;
  constexpr int block_bytes = Nmax == 15 ? 18 : 22;
  auto* dst = static_cast<uint8_t*>(out);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* x = in + b * 32;
    uint8_t* y = dst + b * block_bytes;
    fb v[kVecs];
    for (int k = 0; k < kVecs; ++k) v[k] = fb::load_unaligned(x + k * kW);
    if (!block_finite(v)) {
      if (Nmax == 15)
        from_float_q4_0(x, y, 32);
      else
        from_float_q5_0(x, y, 32);
      continue;
    }
    const float max = block_signed_max(v, x);
    const float d = max / float(Nmax == 15 ? -8 : -16);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t d16 = fp32_to_fp16(d);
    std::memcpy(y, &d16, 2);
    ib q[kVecs];
    for (int k = 0; k < kVecs; ++k) q[k] = xsimd::min(xsimd::to_int(v[k] * fb(id) + fb(offset)), ib(Nmax));
    uint8_t* qs = y + (Nmax == 15 ? 2 : 6);
    // Element j in the low nibble of byte j, element j + 16 in the high nibble.
    for (int k = 0; k < kVecs / 2; ++k) {
      const ib packed = (q[k] & ib(0x0F)) | ((q[k + kVecs / 2] & ib(0x0F)) << 4);
      Isa::store_i8(packed, reinterpret_cast<int8_t*>(qs + k * kW));
    }
    if (Nmax == 31) {
      uint32_t qh = 0;
      for (int k = 0; k < kVecs; ++k) qh |= Isa::bit4_mask(q[k]) << (k * kW);
      std::memcpy(y + 2, &qh, 4);
    }
  }
}

}  // namespace
}  // namespace halo::gguf::kernels
