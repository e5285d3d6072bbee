// Body of the SIMD AdamW8bit kernel, written once against xsimd.
//
// Included by exactly one translation unit per ISA (adamw8bit_avx2.cpp,
// adamw8bit_avx512.cpp) after it defines `Arch` (the xsimd arch tag) and
// `kernel_name`. Full float32 blocks run here with the scalar reference's
// operation order (bit-identical results); the short last block and
// float16/bfloat16 parameters go to the scalar reference.
#pragma once

namespace halo::kernels {
namespace {

using batch = xsimd::batch<float, Arch>;
constexpr int64_t kWidth = int64_t(batch::size);

inline float lane_max(const batch& v) {
  alignas(64) float lanes[kWidth];
  v.store_aligned(lanes);
  float best = lanes[0];
  for (int64_t i = 1; i < kWidth; ++i) best = lanes[i] > best ? lanes[i] : best;
  return best;
}

inline void full_block(const AdamW8bitJob& job, int64_t block) {
  const int64_t begin = block * 256;
  auto* param = static_cast<float*>(job.param) + begin;
  const auto* grad = static_cast<const float*>(job.grad) + begin;
  uint8_t* codes1 = job.state1 + begin;
  uint8_t* codes2 = job.state2 + begin;
  const batch scale1(job.absmax1[block]), scale2(job.absmax2[block]);
  const batch beta1(job.beta1), beta2(job.beta2), one_minus_beta1(1.0f - job.beta1), one_minus_beta2(1.0f - job.beta2);
  const batch gnorm(job.gnorm_scale), decay(job.decay_factor), step_size(job.step_size);
  const batch correction2(job.correction2), eps(job.eps);
  alignas(64) float moment1[256];
  alignas(64) float moment2[256];
  batch max1(0.0f), max2(0.0f);
  for (int64_t i = 0; i < 256; i += kWidth) {
    alignas(64) float decoded1[kWidth];
    alignas(64) float decoded2[kWidth];
    for (int64_t lane = 0; lane < kWidth; ++lane) {
      decoded1[lane] = job.code1[codes1[i + lane]];
      decoded2[lane] = job.code2[codes2[i + lane]];
    }
    const batch g = batch::load_unaligned(grad + i) * gnorm;
    batch m = batch::load_aligned(decoded1) * scale1;
    batch v = batch::load_aligned(decoded2) * scale2;
    m = m * beta1 + g * one_minus_beta1;
    v = v * beta2 + (g * g) * one_minus_beta2;
    batch p = batch::load_unaligned(param + i) * decay;
    const batch denom = xsimd::sqrt(v) / correction2 + eps;
    p = p - step_size * (m / denom);
    p.store_unaligned(param + i);
    m.store_aligned(moment1 + i);
    v.store_aligned(moment2 + i);
    const batch magnitude = xsimd::abs(m);
    max1 = xsimd::select(magnitude > max1, magnitude, max1);  // NaN never wins, as the reference
    max2 = xsimd::select(v > max2, v, max2);
  }
  const float found1 = lane_max(max1);
  const float found2 = lane_max(max2);
  job.absmax1[block] = found1;
  job.absmax2[block] = found2;
  const float inverse1 = found1 > 0.0f ? 1.0f / found1 : 0.0f;
  const float inverse2 = found2 > 0.0f ? 1.0f / found2 : 0.0f;
  for (int64_t i = 0; i < 256; ++i) {
    codes1[i] = nearest_code(job.mid1, moment1[i] * inverse1);
    codes2[i] = nearest_code(job.mid2, moment2[i] * inverse2);
  }
}

inline void run_blocks(const AdamW8bitJob& job, int64_t block_begin, int64_t block_end) {
  if (job.dtype != Format::f32) {
    adamw8bit_scalar(job, block_begin, block_end);
    return;
  }
  for (int64_t block = block_begin; block < block_end; ++block) {
    if ((block + 1) * 256 > job.n)
      adamw8bit_scalar(job, block, block + 1);
    else
      full_block(job, block);
  }
}

}  // namespace
}  // namespace halo::kernels
