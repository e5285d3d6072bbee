// The scalar reference of the AdamW8bit step: the ground truth the SIMD and
// CUDA kernels are tested against (same operation order, no FMA contraction).
#include <algorithm>
#include <cmath>

#include "halo/core/convert.hpp"
#include "src/optim/adamw8bit_kernels.hpp"

namespace halo::kernels {

uint8_t nearest_code(const float* mid, float value) {
  int index = 0;
  for (int step = 128; step >= 1; step >>= 1) index += value > mid[index + step - 1] ? step : 0;
  return uint8_t(index);
}

void adamw8bit_scalar(const AdamW8bitJob& job, int64_t block_begin, int64_t block_end) {
  const float one_minus_beta1 = 1.0f - job.beta1;
  const float one_minus_beta2 = 1.0f - job.beta2;
  float moment1[256];
  float moment2[256];
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t begin = block * 256;
    const int64_t end = std::min(job.n, begin + 256);
    const float scale1 = job.absmax1[block];
    const float scale2 = job.absmax2[block];
    float max1 = 0.0f;
    float max2 = 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      const float g = load_as_float(job.grad, job.dtype, i) * job.gnorm_scale;
      float m = job.code1[job.state1[i]] * scale1;
      float v = job.code2[job.state2[i]] * scale2;
      m = m * job.beta1 + g * one_minus_beta1;
      v = v * job.beta2 + (g * g) * one_minus_beta2;
      float p = load_as_float(job.param, job.dtype, i) * job.decay_factor;
      const float denom = std::sqrt(v) / job.correction2 + job.eps;
      p = p - job.step_size * (m / denom);
      store_from_float(job.param, job.dtype, i, p);
      moment1[i - begin] = m;
      moment2[i - begin] = v;
      const float magnitude = std::fabs(m);
      max1 = magnitude > max1 ? magnitude : max1;  // NaN never wins
      max2 = v > max2 ? v : max2;
    }
    job.absmax1[block] = max1;
    job.absmax2[block] = max2;
    const float inverse1 = max1 > 0.0f ? 1.0f / max1 : 0.0f;
    const float inverse2 = max2 > 0.0f ? 1.0f / max2 : 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      job.state1[i] = nearest_code(job.mid1, moment1[i - begin] * inverse1);
      job.state2[i] = nearest_code(job.mid2, moment2[i - begin] * inverse2);
    }
  }
}

}  // namespace halo::kernels
