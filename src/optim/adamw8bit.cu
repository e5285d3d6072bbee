// CUDA AdamW8bit step on device pointers: one thread block per 256-element
// state block, one element per thread; the block's new absmax comes from a
// shared-memory reduction. The arithmetic order is the scalar reference's
// (adamw8bit_scalar.cpp), built with -fmad=false.
#include <cuda_runtime.h>

#include <cmath>

#include "halo/core/codebooks.hpp"
#include "halo/core/convert.hpp"
#include "halo/core/error.hpp"
#include "halo/optim/adamw8bit.hpp"
#include "src/cuda/cuda_api.hpp"

namespace halo::cuda {
namespace {

struct Maps {
  float code1[256];
  float code2[256];
  float mid1[255];
  float mid2[255];
};

struct StepArgs {
  float beta1, beta2, eps, decay_factor, step_size, correction2, gnorm_scale;
};

__device__ uint8_t nearest(const float* mid, float value) {
  int index = 0;
  for (int step = 128; step >= 1; step >>= 1) index += value > mid[index + step - 1] ? step : 0;
  return uint8_t(index);
}

__global__ void adamw8bit_kernel(void* param, const void* grad, Format dtype, int64_t n, uint8_t* state1,
                                 uint8_t* state2, float* absmax1, float* absmax2, const Maps* maps, StepArgs a) {
  __shared__ float max1[256];
  __shared__ float max2[256];
  const int64_t block = blockIdx.x;
  const int64_t i = block * 256 + threadIdx.x;
  const bool live = i < n;
  float m = 0.0f, v = 0.0f;
  if (live) {
    const float g = load_as_float(grad, dtype, i) * a.gnorm_scale;
    m = maps->code1[state1[i]] * absmax1[block];
    v = maps->code2[state2[i]] * absmax2[block];
    m = m * a.beta1 + g * (1.0f - a.beta1);
    v = v * a.beta2 + (g * g) * (1.0f - a.beta2);
    float p = load_as_float(param, dtype, i) * a.decay_factor;
    const float denom = sqrtf(v) / a.correction2 + a.eps;
    p = p - a.step_size * (m / denom);
    store_from_float(param, dtype, i, p);
  }
  const float magnitude = fabsf(m);
  max1[threadIdx.x] = live && magnitude > 0.0f ? magnitude : 0.0f;
  max2[threadIdx.x] = live && v > 0.0f ? v : 0.0f;
  __syncthreads();
  for (int width = 128; width > 0; width >>= 1) {
    if (threadIdx.x < width) {
      const float other1 = max1[threadIdx.x + width], other2 = max2[threadIdx.x + width];
      max1[threadIdx.x] = other1 > max1[threadIdx.x] ? other1 : max1[threadIdx.x];
      max2[threadIdx.x] = other2 > max2[threadIdx.x] ? other2 : max2[threadIdx.x];
    }
    __syncthreads();
  }
  const float found1 = max1[0], found2 = max2[0];
  __syncthreads();
  if (threadIdx.x == 0) {
    absmax1[block] = found1;
    absmax2[block] = found2;
  }
  if (live) {
    state1[i] = nearest(maps->mid1, m * (found1 > 0.0f ? 1.0f / found1 : 0.0f));
    state2[i] = nearest(maps->mid2, v * (found2 > 0.0f ? 1.0f / found2 : 0.0f));
  }
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    fail<BackendUnavailable>("cuda::adamw8bit_step_device", what, ": ", cudaGetErrorString(status));
}

// The code books and midpoints live in device memory once per device.
const Maps* device_maps() {
  static const Maps* maps = [] {
    Maps host{};
    for (int i = 0; i < 256; ++i) {
      host.code1[i] = kDynamicMapSigned[i];
      host.code2[i] = dynamic_map_unsigned()[i];
    }
    for (int i = 0; i < 255; ++i) {
      host.mid1[i] = (host.code1[i] + host.code1[i + 1]) * 0.5f;
      host.mid2[i] = (host.code2[i] + host.code2[i + 1]) * 0.5f;
    }
    Maps* device = nullptr;
    check(cudaMalloc(&device, sizeof(Maps)), "cudaMalloc");
    check(cudaMemcpy(device, &host, sizeof(Maps), cudaMemcpyHostToDevice), "copy maps");
    return device;
  }();
  return maps;
}

}  // namespace

void adamw8bit_step_device(void* param, const void* grad, Format dtype, int64_t n, uint8_t* state1,
                           uint8_t* state2, float* absmax1, float* absmax2, const AdamW8bitSettings& s,
                           uintptr_t stream) {
  const double correction1 = 1.0 - std::pow(double(s.beta1), double(s.step));
  const double correction2 = std::sqrt(1.0 - std::pow(double(s.beta2), double(s.step)));
  const StepArgs args{s.beta1, s.beta2, s.eps, float(1.0 - double(s.lr) * double(s.weight_decay)),
                      float(double(s.lr) / correction1), float(correction2), s.gnorm_scale};
  const int64_t blocks = (n + kOptimizerBlocksize - 1) / kOptimizerBlocksize;
  adamw8bit_kernel<<<unsigned(blocks), 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      param, grad, dtype, n, state1, state2, absmax1, absmax2, device_maps(), args);
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace halo::cuda
