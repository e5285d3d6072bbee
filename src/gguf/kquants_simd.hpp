// Body of the SIMD K-quant kernels, written once against xsimd and included by
// one translation unit per ISA (kquants_avx2.cpp, kquants_avx512.cpp) after it
// defines `Isa` with `using arch = xsimd::<tag>;`.
//
// Bit-exactness: ggml's scale search runs a sequential float32 sum per
// sub-block. Vectorizing inside a sub-block would reorder those sums, so each
// SIMD lane runs one whole sub-block instead, performing exactly the scalar
// operations in the scalar order (IEEE add/mul/div/sqrt are the same in a lane
// as in a scalar register; the build has no FMA contraction). Groups holding a
// NaN or infinity go to the scalar reference, so every input gives the
// reference's bytes. The cheap per-super-block tail (scale packing, final
// codes) is the scalar reference's own code.
#pragma once

namespace halo::gguf::kernels {
namespace {

using fb = xsimd::batch<float, Isa::arch>;
using ib = xsimd::batch<int32_t, Isa::arch>;
using mb = xsimd::batch_bool<float, Isa::arch>;
constexpr int kW = int(fb::size);

// ggml's nearest_int (round half to even by adding 1.5 * 2^23), as a float.
inline fb nearest(const fb& v) {
  const ib bits = xsimd::bitwise_cast<ib>(v + fb(12582912.0f));
  return xsimd::to_float((bits & ib(0x007fffff)) - ib(0x00400000));
}

inline fb clamp(const fb& v, float lo, float hi) { return xsimd::min(xsimd::max(v, fb(lo)), fb(hi)); }

inline bool all_finite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += kW) {
    const fb v = fb::load_unaligned(x + i);
    // x - x is 0 for finite x and NaN for NaN and infinities.
    if (xsimd::any(xsimd::isnan(v - v))) return false;
  }
  return true;
}

// ggml's make_qkx2_quants for kW sub-blocks of 32 at once (lane = sub-block),
// with Q4_K / Q5_K's weights (|x| + rms of the sub-block).
template <int Nmax>
void search_lanes_k(const float* x, float* scales, float* mins, uint8_t* L) {
  constexpr float rmin = Nmax == 15 ? -1.0f : -0.5f;
  constexpr int nstep = Nmax == 15 ? 20 : 15;
  constexpr float rdelta = 0.1f;
  alignas(64) float X[32][kW];
  alignas(64) float Wt[32][kW];
  for (int lane = 0; lane < kW; ++lane)
    for (int i = 0; i < 32; ++i) X[i][lane] = x[lane * 32 + i];

  fb sum_x2(0.0f);
  for (int i = 0; i < 32; ++i) {
    const fb v = fb::load_aligned(X[i]);
    sum_x2 = sum_x2 + v * v;
  }
  const fb av_x = xsimd::sqrt(sum_x2 / fb(32.0f));
  for (int i = 0; i < 32; ++i) (av_x + xsimd::abs(fb::load_aligned(X[i]))).store_aligned(Wt[i]);

  fb min = fb::load_aligned(X[0]), max = min;
  fb sum_w = fb::load_aligned(Wt[0]);
  fb sum_x = sum_w * min;
  for (int i = 1; i < 32; ++i) {
    const fb v = fb::load_aligned(X[i]), w = fb::load_aligned(Wt[i]);
    min = xsimd::select(v < min, v, min);
    max = xsimd::select(v > max, v, max);
    sum_w = sum_w + w;
    sum_x = sum_x + w * v;
  }
  min = xsimd::select(min > fb(0.0f), fb(0.0f), min);
  const mb flat = max == min;

  fb iscale = fb(float(Nmax)) / (max - min);
  fb scale = fb(1.0f) / iscale;
  fb best_error(0.0f);
  alignas(64) float Lbest[32][kW];
  for (int i = 0; i < 32; ++i) {
    const fb v = fb::load_aligned(X[i]);
    const fb l = clamp(nearest(iscale * (v - min)), 0.0f, float(Nmax));
    l.store_aligned(Lbest[i]);
    const fb diff = scale * l + min - v;
    best_error = best_error + fb::load_aligned(Wt[i]) * (diff * diff);
  }
  alignas(64) float Laux[32][kW];
  for (int is = 0; is <= nstep; ++is) {
    // The trial numerator is the same for every lane: computed once, in ggml's order. The
    // denominator uses the current min, which an earlier trial may have replaced.
    const float numerator = rmin + rdelta * float(is) + float(Nmax);
    iscale = fb(numerator) / (max - min);
    fb sum_l(0.0f), sum_l2(0.0f), sum_xl(0.0f);
    for (int i = 0; i < 32; ++i) {
      const fb v = fb::load_aligned(X[i]);
      const fb l = clamp(nearest(iscale * (v - min)), 0.0f, float(Nmax));
      l.store_aligned(Laux[i]);
      const fb wl = fb::load_aligned(Wt[i]) * l;
      sum_l = sum_l + wl;
      sum_l2 = sum_l2 + wl * l;
      sum_xl = sum_xl + wl * v;
    }
    const fb D = sum_w * sum_l2 - sum_l * sum_l;
    const mb solvable = D > fb(0.0f);
    if (!xsimd::any(solvable)) continue;
    fb this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
    fb this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    const mb positive_min = this_min > fb(0.0f);
    this_scale = xsimd::select(positive_min, sum_xl / sum_l2, this_scale);
    this_min = xsimd::select(positive_min, fb(0.0f), this_min);
    fb cur_error(0.0f);
    for (int i = 0; i < 32; ++i) {
      const fb diff = this_scale * fb::load_aligned(Laux[i]) + this_min - fb::load_aligned(X[i]);
      cur_error = cur_error + fb::load_aligned(Wt[i]) * (diff * diff);
    }
    const mb better = solvable & (cur_error < best_error);
    if (!xsimd::any(better)) continue;
    for (int i = 0; i < 32; ++i)
      xsimd::select(better, fb::load_aligned(Laux[i]), fb::load_aligned(Lbest[i])).store_aligned(Lbest[i]);
    best_error = xsimd::select(better, cur_error, best_error);
    scale = xsimd::select(better, this_scale, scale);
    min = xsimd::select(better, this_min, min);
  }
  // A flat sub-block (max == min): codes 0, scale 0, as the reference returns early.
  scale = xsimd::select(flat, fb(0.0f), scale);
  (fb(0.0f) - min).store_unaligned(mins);
  scale.store_unaligned(scales);
  for (int i = 0; i < 32; ++i) {
    alignas(64) float codes[kW];
    xsimd::select(flat, fb(0.0f), fb::load_aligned(Lbest[i])).store_aligned(codes);
    for (int lane = 0; lane < kW; ++lane) L[lane * 32 + i] = uint8_t(codes[lane]);
  }
}

// Q4_K (Nmax 15) / Q5_K (Nmax 31): kW sub-blocks per group, kW / 8 super-blocks.
template <int Nmax>
void quantize_k(const float* in, void* out, int64_t blocks, int64_t block_bytes) {
  static_assert(kW % 8 == 0, "a group must hold whole super-blocks");
  constexpr int per_group = kW / 8;
  auto* dst = static_cast<uint8_t*>(out);
  uint8_t L[256 * per_group];
  float scales[8 * per_group], mins[8 * per_group];
  int64_t b = 0;
  for (; b + per_group <= blocks; b += per_group) {
    const float* x = in + b * 256;
    if (!all_finite(x, 256 * per_group)) {
      for (int g = 0; g < per_group; ++g) {
        if (Nmax == 15)
          from_float_q4_k(x + g * 256, dst + (b + g) * block_bytes, 256);
        else
          from_float_q5_k(x + g * 256, dst + (b + g) * block_bytes, 256);
      }
      continue;
    }
    search_lanes_k<Nmax>(x, scales, mins, L);
    for (int g = 0; g < per_group; ++g) {
      if (Nmax == 15)
        search::finish_q4_k(x + g * 256, scales + 8 * g, mins + 8 * g, L + 256 * g, dst + (b + g) * block_bytes);
      else
        search::finish_q5_k(x + g * 256, scales + 8 * g, mins + 8 * g, L + 256 * g, dst + (b + g) * block_bytes);
    }
  }
  if (b < blocks) {
    if (Nmax == 15)
      from_float_q4_k(in + b * 256, dst + b * block_bytes, (blocks - b) * 256);
    else
      from_float_q5_k(in + b * 256, dst + b * block_bytes, (blocks - b) * 256);
  }
}

// ggml's make_qx_quants(16, 32, x, L, rmse_type 1) for kW sub-blocks of 16 at once.
void search_lanes_q6(const float* x, float* scales, int8_t* L) {
  constexpr int nmax = 32;
  alignas(64) float X[16][kW];
  for (int lane = 0; lane < kW; ++lane)
    for (int i = 0; i < 16; ++i) X[i][lane] = x[lane * 16 + i];
  fb max(0.0f), amax(0.0f);
  for (int i = 0; i < 16; ++i) {
    const fb v = fb::load_aligned(X[i]);
    const fb ax = xsimd::abs(v);
    const mb bigger = ax > amax;
    amax = xsimd::select(bigger, ax, amax);
    max = xsimd::select(bigger, v, max);
  }
  const mb zero = amax < fb(blocks::kGroupMaxEps);
  fb iscale = fb(float(-nmax)) / max;
  fb sumlx(0.0f), suml2(0.0f);
  alignas(64) float Lbest[16][kW];
  for (int i = 0; i < 16; ++i) {
    const fb v = fb::load_aligned(X[i]);
    const fb l = clamp(nearest(iscale * v), float(-nmax), float(nmax - 1));
    (l + fb(float(nmax))).store_aligned(Lbest[i]);
    const fb w = v * v;
    sumlx = sumlx + w * v * l;
    suml2 = suml2 + w * l * l;
  }
  fb scale = xsimd::select(suml2 != fb(0.0f), sumlx / suml2, fb(0.0f));
  fb best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    const float numerator = -(float(nmax) + 0.1f * float(is));
    iscale = fb(numerator) / max;
    sumlx = fb(0.0f);
    suml2 = fb(0.0f);
    for (int i = 0; i < 16; ++i) {
      const fb v = fb::load_aligned(X[i]);
      const fb l = clamp(nearest(iscale * v), float(-nmax), float(nmax - 1));
      const fb w = v * v;
      sumlx = sumlx + w * v * l;
      suml2 = suml2 + w * l * l;
    }
    const mb better = (suml2 > fb(0.0f)) & (sumlx * sumlx > best * suml2);
    if (!xsimd::any(better)) continue;
    for (int i = 0; i < 16; ++i) {
      const fb l = clamp(nearest(iscale * fb::load_aligned(X[i])), float(-nmax), float(nmax - 1));
      xsimd::select(better, l + fb(float(nmax)), fb::load_aligned(Lbest[i])).store_aligned(Lbest[i]);
    }
    scale = xsimd::select(better, sumlx / suml2, scale);
    best = xsimd::select(better, scale * sumlx, best);
  }
  xsimd::select(zero, fb(0.0f), scale).store_unaligned(scales);
  for (int i = 0; i < 16; ++i) {
    alignas(64) float codes[kW];
    xsimd::select(zero, fb(0.0f), fb::load_aligned(Lbest[i])).store_aligned(codes);
    for (int lane = 0; lane < kW; ++lane) L[lane * 16 + i] = int8_t(codes[lane]);
  }
}

void quantize_q6(const float* in, void* out, int64_t blocks) {
  constexpr int64_t bytes = 210;
  auto* dst = static_cast<uint8_t*>(out);
  int8_t L[256];
  float scales[16];
  for (int64_t b = 0; b < blocks; ++b) {
    const float* x = in + b * 256;
    if (!all_finite(x, 256)) {
      from_float_q6_k(x, dst + b * bytes, 256);
      continue;
    }
    for (int g = 0; g < 16; g += kW) search_lanes_q6(x + 16 * g, scales + g, L + 16 * g);
    search::finish_q6_k(x, scales, L, dst + b * bytes);
  }
}

}  // namespace
}  // namespace halo::gguf::kernels
