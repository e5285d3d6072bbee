// Scalar reference row conversions of ggml's K types (256-element super-blocks):
// Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K. The quantizers search scales the way
// ggml's reference quantizer does (no importance matrix), with the same float32
// operations in the same order, so they give the same bytes.
#include <cmath>
#include <cstring>

#include "halo/gguf/quants.hpp"
#include "src/gguf/blocks.hpp"
#include "src/gguf/kquants_search.hpp"

namespace halo::gguf {

using namespace blocks;

// ---------------------------------------------------------------- Q2_K

void from_float_q2_k(const float* in, void* out, int64_t n) {
  auto* y = static_cast<Q2_K*>(out);
  uint8_t L[kQKK], Laux[16];
  float weights[16], mins[16], scales[16];
  const float q4scale = 15.0f;
  for (int64_t b = 0; b < n / kQKK; ++b) {
    const float* x = in + b * kQKK;
    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < 16; ++j) {
      for (int l = 0; l < 16; ++l) weights[l] = std::fabs(x[16 * j + l]);
      scales[j] = search::min_scale_quants(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux, -0.5f, 0.1f, 15, true);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    if (max_scale > 0) {
      const float iscale = q4scale / max_scale;
      for (int j = 0; j < 16; ++j) y[b].scales[j] = uint8_t(nearest_int(iscale * scales[j]));
      y[b].d = fp32_to_fp16(max_scale / q4scale);
    } else {
      for (int j = 0; j < 16; ++j) y[b].scales[j] = 0;
      y[b].d = fp32_to_fp16(0.0f);
    }
    if (max_min > 0) {
      const float iscale = q4scale / max_min;
      for (int j = 0; j < 16; ++j) y[b].scales[j] = uint8_t(y[b].scales[j] | (nearest_int(iscale * mins[j]) << 4));
      y[b].dmin = fp32_to_fp16(max_min / q4scale);
    } else {
      y[b].dmin = fp32_to_fp16(0.0f);
    }
    for (int j = 0; j < 16; ++j) {
      const float d = fp16_to_fp32(y[b].d) * float(y[b].scales[j] & 0xF);
      if (d == 0.0f) continue;
      const float dm = fp16_to_fp32(y[b].dmin) * float(y[b].scales[j] >> 4);
      for (int i = 0; i < 16; ++i) {
        const int l = nearest_int((x[16 * j + i] + dm) / d);
        L[16 * j + i] = uint8_t(l < 0 ? 0 : (l > 3 ? 3 : l));
      }
    }
    for (int j = 0; j < kQKK; j += 128)
      for (int l = 0; l < 32; ++l)
        y[b].qs[j / 4 + l] = uint8_t(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
  }
}

void to_float_q2_k(const void* in, float* out, int64_t n) {
  const auto* x = static_cast<const Q2_K*>(in);
  for (int64_t b = 0; b < n / kQKK; ++b) {
    const float d = fp16_to_fp32(x[b].d), min = fp16_to_fp32(x[b].dmin);
    const uint8_t* q = x[b].qs;
    int is = 0;
    for (int part = 0; part < kQKK; part += 128, q += 32) {
      for (int shift = 0; shift < 8; shift += 2) {
        for (int half = 0; half < 2; ++half) {
          const uint8_t sc = x[b].scales[is++];
          const float dl = d * float(sc & 0xF), ml = min * float(sc >> 4);
          for (int l = 0; l < 16; ++l) *out++ = dl * float((q[l + 16 * half] >> shift) & 3) - ml;
        }
      }
    }
  }
}

// ---------------------------------------------------------------- Q3_K

void from_float_q3_k(const float* in, void* out, int64_t n) {
  auto* y = static_cast<Q3_K*>(out);
  int8_t L[kQKK];
  float scales[16];
  for (int64_t b = 0; b < n / kQKK; ++b) {
    const float* x = in + b * kQKK;
    float max_scale = 0.0f, amax = 0.0f;
    for (int j = 0; j < 16; ++j) {
      scales[j] = search::symmetric_rmse_quants_q3(16, 4, x + 16 * j, L + 16 * j);
      const float scale = std::fabs(scales[j]);
      if (scale > amax) {
        amax = scale;
        max_scale = scales[j];
      }
    }
    std::memset(y[b].scales, 0, 12);
    if (max_scale != 0.0f) {
      const float iscale = -32.0f / max_scale;
      for (int j = 0; j < 16; ++j) {
        int8_t l = int8_t(nearest_int(iscale * scales[j]));
        l = int8_t((l < -32 ? -32 : (l > 31 ? 31 : l)) + 32);
        if (j < 8)
          y[b].scales[j] = uint8_t(l & 0xF);
        else
          y[b].scales[j - 8] = uint8_t(y[b].scales[j - 8] | ((l & 0xF) << 4));
        l = int8_t(l >> 4);
        y[b].scales[j % 4 + 8] = uint8_t(y[b].scales[j % 4 + 8] | (l << (2 * (j / 4))));
      }
      y[b].d = fp32_to_fp16(1 / iscale);
    } else {
      y[b].d = fp32_to_fp16(0.0f);
    }
    for (int j = 0; j < 16; ++j) {
      int sc = j < 8 ? (y[b].scales[j] & 0xF) : (y[b].scales[j - 8] >> 4);
      sc = int8_t((sc | (((y[b].scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
      const float d = fp16_to_fp32(y[b].d) * float(sc);
      if (d == 0.0f) continue;
      for (int i = 0; i < 16; ++i) {
        const int l = nearest_int(x[16 * j + i] / d);
        L[16 * j + i] = int8_t((l < -4 ? -4 : (l > 3 ? 3 : l)) + 4);
      }
    }
    std::memset(y[b].hmask, 0, 32);
    int m = 0;
    uint8_t hm = 1;
    for (int j = 0; j < kQKK; ++j) {
      if (L[j] > 3) {
        y[b].hmask[m] = uint8_t(y[b].hmask[m] | hm);
        L[j] = int8_t(L[j] - 4);
      }
      if (++m == 32) {
        m = 0;
        hm = uint8_t(hm << 1);
      }
    }
    for (int j = 0; j < kQKK; j += 128)
      for (int l = 0; l < 32; ++l)
        y[b].qs[j / 4 + l] = uint8_t(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
  }
}

void to_float_q3_k(const void* in, float* out, int64_t n) {
  const auto* x = static_cast<const Q3_K*>(in);
  for (int64_t b = 0; b < n / kQKK; ++b) {
    const float d_all = fp16_to_fp32(x[b].d);
    // 16 signed 6-bit scales: low 4 bits in scales[0..7] (two per byte), high 2 bits in scales[8..11].
    int8_t scale[16];
    for (int j = 0; j < 16; ++j) {
      const int low = j < 8 ? (x[b].scales[j] & 0xF) : (x[b].scales[j - 8] >> 4);
      const int high = (x[b].scales[8 + j % 4] >> (2 * (j / 4))) & 3;
      scale[j] = int8_t(low | (high << 4));
    }
    const uint8_t* q = x[b].qs;
    const uint8_t* hm = x[b].hmask;
    uint8_t m = 1;
    int is = 0;
    for (int part = 0; part < kQKK; part += 128, q += 32) {
      for (int shift = 0; shift < 8; shift += 2, m = uint8_t(m << 1)) {
        for (int half = 0; half < 2; ++half) {
          const float dl = d_all * float(scale[is++] - 32);
          for (int l = 0; l < 16; ++l) {
            const int low = (q[l + 16 * half] >> shift) & 3;
            *out++ = dl * float(low - ((hm[l + 16 * half] & m) ? 0 : 4));
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- Q4_K / Q5_K

// Scales and mins of the 8 sub-blocks as 6-bit numbers: the first four in the
// low 6 bits of bytes 0..3 (scales) and 4..7 (mins), the last four split into
// 4 low bits in bytes 8..11 and 2 high bits in the top of bytes 0..7.
static void pack_scales_mins_k4(const float* scales, const float* mins, float max_scale, float max_min,
                                uint8_t* packed) {
  const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
  const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
  for (int j = 0; j < 8; ++j) {
    uint8_t ls = uint8_t(nearest_int(inv_scale * scales[j]));
    uint8_t lm = uint8_t(nearest_int(inv_min * mins[j]));
    ls = ls < 63 ? ls : 63;
    lm = lm < 63 ? lm : 63;
    if (j < 4) {
      packed[j] = ls;
      packed[j + 4] = lm;
    } else {
      packed[j + 4] = uint8_t((ls & 0xF) | ((lm & 0xF) << 4));
      packed[j - 4] = uint8_t(packed[j - 4] | ((ls >> 4) << 6));
      packed[j] = uint8_t(packed[j] | ((lm >> 4) << 6));
    }
  }
}

// Sub-block search of Q4_K (nmax 15) and Q5_K (nmax 31): weights |x| + rms(x).
template <int Nmax>
static void search_sub_blocks_k(const float* x, uint8_t* L, float* scales, float* mins) {
  constexpr float rmin = Nmax == 15 ? -1.0f : -0.5f;
  constexpr int nstep = Nmax == 15 ? 20 : 15;
  uint8_t Laux[32];
  float weights[32];
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + 32 * j;
    float sum_x2 = 0.0f;
    for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xs[l]);
    scales[j] = search::min_scale_quants(32, Nmax, xs, weights, L + 32 * j, &mins[j], Laux, rmin, 0.1f, nstep, false);
  }
}

// Final codes of a Q4_K / Q5_K super-block from its stored (rounded) scales.
template <int Nmax>
static void requantize_k(const float* x, const uint8_t* packed, uint16_t d16, uint16_t dmin16, uint8_t* L) {
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    scale_min_k4(j, packed, &sc, &m);
    const float d = fp16_to_fp32(d16) * float(sc);
    if (d == 0.0f) continue;
    const float dm = fp16_to_fp32(dmin16) * float(m);
    for (int i = 0; i < 32; ++i) {
      const int l = nearest_int((x[32 * j + i] + dm) / d);
      L[32 * j + i] = uint8_t(l < 0 ? 0 : (l > Nmax ? Nmax : l));
    }
  }
}

template <int Nmax>
static void finish_k(const float* x, const float* scales, const float* mins, uint8_t* L, void* block) {
  // Q4_K and Q5_K share the super-block header layout (d, dmin, scales[12]) at the same offsets.
  auto* y = static_cast<Q4_K*>(block);
  float max_scale = 0.0f, max_min = 0.0f;
  for (int j = 0; j < 8; ++j) {
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  pack_scales_mins_k4(scales, mins, max_scale, max_min, y->scales);
  y->d = fp32_to_fp16(max_scale / 63.0f);
  y->dmin = fp32_to_fp16(max_min / 63.0f);
  requantize_k<Nmax>(x, y->scales, y->d, y->dmin, L);
  if constexpr (Nmax == 15) {
    for (int j = 0; j < kQKK; j += 64)
      for (int l = 0; l < 32; ++l) y->qs[j / 2 + l] = uint8_t(L[j + l] | (L[j + l + 32] << 4));
  } else {
    auto* y5 = static_cast<Q5_K*>(block);
    std::memset(y5->qh, 0, 32);
    uint8_t m1 = 1, m2 = 2;
    uint8_t* ql = y5->qs;
    for (int part = 0; part < kQKK; part += 64, ql += 32, m1 = uint8_t(m1 << 2), m2 = uint8_t(m2 << 2)) {
      for (int j = 0; j < 32; ++j) {
        int l1 = L[part + j], l2 = L[part + j + 32];
        if (l1 > 15) {
          l1 -= 16;
          y5->qh[j] = uint8_t(y5->qh[j] | m1);
        }
        if (l2 > 15) {
          l2 -= 16;
          y5->qh[j] = uint8_t(y5->qh[j] | m2);
        }
        ql[j] = uint8_t(l1 | (l2 << 4));
      }
    }
  }
}

void search::finish_q4_k(const float* x, const float* scales, const float* mins, uint8_t* L, void* block) {
  finish_k<15>(x, scales, mins, L, block);
}

void search::finish_q5_k(const float* x, const float* scales, const float* mins, uint8_t* L, void* block) {
  finish_k<31>(x, scales, mins, L, block);
}

void from_float_q4_k(const float* in, void* out, int64_t n) {
  auto* y = static_cast<Q4_K*>(out);
  uint8_t L[kQKK];
  float scales[8], mins[8];
  for (int64_t b = 0; b < n / kQKK; ++b) {
    search_sub_blocks_k<15>(in + b * kQKK, L, scales, mins);
    finish_k<15>(in + b * kQKK, scales, mins, L, &y[b]);
  }
}

void from_float_q5_k(const float* in, void* out, int64_t n) {
  auto* y = static_cast<Q5_K*>(out);
  uint8_t L[kQKK];
  float scales[8], mins[8];
  for (int64_t b = 0; b < n / kQKK; ++b) {
    search_sub_blocks_k<31>(in + b * kQKK, L, scales, mins);
    finish_k<31>(in + b * kQKK, scales, mins, L, &y[b]);
  }
}

void to_float_q4_k(const void* in, float* out, int64_t n) {
  const auto* x = static_cast<const Q4_K*>(in);
  for (int64_t b = 0; b < n / kQKK; ++b) {
    const float d = fp16_to_fp32(x[b].d), min = fp16_to_fp32(x[b].dmin);
    const uint8_t* q = x[b].qs;
    for (int is = 0; is < 8; is += 2, q += 32) {
      uint8_t sc, m;
      scale_min_k4(is, x[b].scales, &sc, &m);
      const float d1 = d * float(sc), m1 = min * float(m);
      scale_min_k4(is + 1, x[b].scales, &sc, &m);
      const float d2 = d * float(sc), m2 = min * float(m);
      for (int l = 0; l < 32; ++l) *out++ = d1 * float(q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *out++ = d2 * float(q[l] >> 4) - m2;
    }
  }
}

void to_float_q5_k(const void* in, float* out, int64_t n) {
  const auto* x = static_cast<const Q5_K*>(in);
  for (int64_t b = 0; b < n / kQKK; ++b) {
    const float d = fp16_to_fp32(x[b].d), min = fp16_to_fp32(x[b].dmin);
    const uint8_t* ql = x[b].qs;
    const uint8_t* qh = x[b].qh;
    uint8_t u1 = 1, u2 = 2;
    for (int is = 0; is < 8; is += 2, ql += 32, u1 = uint8_t(u1 << 2), u2 = uint8_t(u2 << 2)) {
      uint8_t sc, m;
      scale_min_k4(is, x[b].scales, &sc, &m);
      const float d1 = d * float(sc), m1 = min * float(m);
      scale_min_k4(is + 1, x[b].scales, &sc, &m);
      const float d2 = d * float(sc), m2 = min * float(m);
      for (int l = 0; l < 32; ++l) *out++ = d1 * float((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - m1;
      for (int l = 0; l < 32; ++l) *out++ = d2 * float((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
    }
  }
}

// ---------------------------------------------------------------- Q6_K

void search::finish_q6_k(const float* x, const float* scales, int8_t* L, void* block) {
  auto* y = static_cast<Q6_K*>(block);
  float max_scale = 0.0f, max_abs_scale = 0.0f;
  for (int ib = 0; ib < 16; ++ib) {
    const float abs_scale = std::fabs(scales[ib]);
    if (abs_scale > max_abs_scale) {
      max_abs_scale = abs_scale;
      max_scale = scales[ib];
    }
  }
  if (max_abs_scale < kGroupMaxEps) {
    std::memset(y, 0, sizeof(Q6_K));
    y->d = fp32_to_fp16(0.0f);
    return;
  }
  const float iscale = -128.0f / max_scale;
  y->d = fp32_to_fp16(1 / iscale);
  for (int ib = 0; ib < 16; ++ib) {
    const int s = nearest_int(iscale * scales[ib]);
    y->scales[ib] = int8_t(s < 127 ? s : 127);
  }
  for (int j = 0; j < 16; ++j) {
    const float d = fp16_to_fp32(y->d) * float(y->scales[j]);
    if (d == 0.0f) continue;
    for (int i = 0; i < 16; ++i) {
      const int l = nearest_int(x[16 * j + i] / d);
      L[16 * j + i] = int8_t((l < -32 ? -32 : (l > 31 ? 31 : l)) + 32);
    }
  }
  uint8_t* ql = y->ql;
  uint8_t* qh = y->qh;
  for (int j = 0; j < kQKK; j += 128, ql += 64, qh += 32) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF;
      const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
      ql[l] = uint8_t(q1 | (q3 << 4));
      ql[l + 32] = uint8_t(q2 | (q4 << 4));
      qh[l] = uint8_t((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                      ((L[j + l + 96] >> 4) << 6));
    }
  }
}

void from_float_q6_k(const float* in, void* out, int64_t n) {
  auto* y = static_cast<Q6_K*>(out);
  int8_t L[kQKK];
  float scales[16];
  for (int64_t b = 0; b < n / kQKK; ++b) {
    const float* x = in + b * kQKK;
    for (int ib = 0; ib < 16; ++ib) scales[ib] = search::symmetric_rmse_quants(16, 32, x + 16 * ib, L + 16 * ib);
    search::finish_q6_k(x, scales, L, &y[b]);
  }
}

void to_float_q6_k(const void* in, float* out, int64_t n) {
  const auto* x = static_cast<const Q6_K*>(in);
  for (int64_t b = 0; b < n / kQKK; ++b) {
    const float d = fp16_to_fp32(x[b].d);
    const uint8_t* ql = x[b].ql;
    const uint8_t* qh = x[b].qh;
    const int8_t* sc = x[b].scales;
    for (int part = 0; part < kQKK; part += 128, out += 128, ql += 64, qh += 32, sc += 8) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = int8_t((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = int8_t((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = int8_t((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = int8_t((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        out[l] = d * float(sc[is]) * float(q1);
        out[l + 32] = d * float(sc[is + 2]) * float(q2);
        out[l + 64] = d * float(sc[is + 4]) * float(q3);
        out[l + 96] = d * float(sc[is + 6]) * float(q4);
      }
    }
  }
}

// ---------------------------------------------------------------- Q8_K

void from_float_q8_k(const float* in, void* out, int64_t n) {
  auto* y = static_cast<Q8_K*>(out);
  for (int64_t b = 0; b < n / kQKK; ++b) {
    const float* x = in + b * kQKK;
    float max = 0.0f, amax = 0.0f;
    for (int j = 0; j < kQKK; ++j) {
      if (std::fabs(x[j]) > amax) {
        amax = std::fabs(x[j]);
        max = x[j];
      }
    }
    if (amax == 0.0f) {
      y[b].d = 0.0f;
      std::memset(y[b].qs, 0, kQKK);
      std::memset(y[b].bsums, 0, sizeof(y[b].bsums));  // ggml leaves them unset; zero is their value
      continue;
    }
    const float iscale = -127.0f / max;
    for (int j = 0; j < kQKK; ++j) {
      const int v = nearest_int(iscale * x[j]);
      y[b].qs[j] = int8_t(v < 127 ? v : 127);
    }
    for (int j = 0; j < 16; ++j) {
      int sum = 0;
      for (int i = 0; i < 16; ++i) sum += y[b].qs[16 * j + i];
      y[b].bsums[j] = int16_t(sum);
    }
    y[b].d = 1 / iscale;
  }
}

void to_float_q8_k(const void* in, float* out, int64_t n) {
  const auto* x = static_cast<const Q8_K*>(in);
  for (int64_t b = 0; b < n / kQKK; ++b)
    for (int j = 0; j < kQKK; ++j) *out++ = x[b].d * float(x[b].qs[j]);
}

}  // namespace halo::gguf
