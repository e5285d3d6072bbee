// CUDA 4-bit matmul (y = x Wᵀ + bias, or y = x W) for W in bitsandbytes' layout.
// Weights are decoded with the same host/device helpers as the CPU reference
// (halo/quant/block.hpp, halo/core/convert.hpp): code * absmax rounded to x's
// precision, products summed in float32 (nvcc builds with -fmad=false).
//
// Forward: one warp per output feature; each lane reads 4 bytes (8 weights) per
// step, so a warp reads 128 consecutive bytes of the row. Transposed: each thread
// owns 8 consecutive columns of W and walks down its rows, so a warp again reads
// 128 consecutive bytes per row. Rows of x are handled 4 at a time.
#include <cuda_runtime.h>

#include "halo/core/error.hpp"
#include "halo/quant/block.hpp"
#include "src/cuda/cuda_api.hpp"

namespace halo::cuda {
namespace {

constexpr int kRowsPerPass = 4;

void check(cudaError_t status, const char* function, const char* what) {
  if (status != cudaSuccess) fail<BackendUnavailable>(function, what, ": ", cudaGetErrorString(status));
}

struct Params {
  Codebook4 format;
  const void* x;
  Format dtype;
  int64_t rows;
  const uint8_t* packed;
  const float* absmax;
  int64_t blocksize;
  int64_t out, in;
  const void* bias;
  void* y;
  bool aligned;  // in % 8 == 0 and packed 4-byte aligned: whole 32-bit words per 8 weights
  int block_shift;  // log2(blocksize)
};

__device__ inline float rounded(float value, Format dtype) {
  if (dtype == Format::bf16) return bf16_to_float(float_to_bf16(value));
  if (dtype == Format::f16) return f16_to_float(float_to_f16(value));
  return value;
}

__device__ inline float weight_at(const Params& p, int64_t flat) {
  return rounded(dequantize4_value(p.format, p.packed, p.absmax, p.blocksize, flat), p.dtype);
}

// The 8 weights of flat elements [flat, flat + 8) (flat a multiple of 8: one block, 4 bytes).
__device__ inline void weights8(const Params& p, int64_t flat, float* w) {
  const uint32_t word = *reinterpret_cast<const uint32_t*>(p.packed + flat / 2);
  const float scale = p.absmax[flat >> p.block_shift];
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const uint32_t byte = (word >> (8 * b)) & 0xffu;
    w[2 * b] = rounded(p.format.code[byte >> 4] * scale, p.dtype);
    w[2 * b + 1] = rounded(p.format.code[byte & 0x0fu] * scale, p.dtype);
  }
}

__global__ void forward_kernel(Params p) {
  const int lane = threadIdx.x % 32;
  const int64_t o = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (o >= p.out) return;
  for (int64_t r0 = 0; r0 < p.rows; r0 += kRowsPerPass) {
    const int count = p.rows - r0 < kRowsPerPass ? int(p.rows - r0) : kRowsPerPass;
    float acc[kRowsPerPass] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (p.aligned) {
      for (int64_t k = 8 * int64_t(lane); k < p.in; k += 256) {
        float w[8];
        weights8(p, o * p.in + k, w);
#pragma unroll
        for (int r = 0; r < kRowsPerPass; ++r) {
          if (r >= count) break;
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[r] += load_as_float(p.x, p.dtype, (r0 + r) * p.in + k + j) * w[j];
        }
      }
    } else {
      for (int64_t k = lane; k < p.in; k += 32) {
        const float w = weight_at(p, o * p.in + k);
        for (int r = 0; r < count; ++r) acc[r] += load_as_float(p.x, p.dtype, (r0 + r) * p.in + k) * w;
      }
    }
    for (int r = 0; r < count; ++r) {
      float sum = acc[r];
      for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
      if (lane == 0) {
        if (p.bias != nullptr) sum += load_as_float(p.bias, p.dtype, o);
        store_from_float(p.y, p.dtype, (r0 + r) * p.out + o, sum);
      }
    }
  }
}

__global__ void transposed_kernel(Params p) {
  const int64_t k0 = 8 * (int64_t(blockIdx.x) * blockDim.x + threadIdx.x);
  if (k0 >= p.in) return;
  const int width = p.in - k0 < 8 ? int(p.in - k0) : 8;
  for (int64_t r0 = 0; r0 < p.rows; r0 += kRowsPerPass) {
    const int count = p.rows - r0 < kRowsPerPass ? int(p.rows - r0) : kRowsPerPass;
    float acc[kRowsPerPass][8] = {};
    for (int64_t o = 0; o < p.out; ++o) {
      float w[8];
      if (p.aligned) {
        weights8(p, o * p.in + k0, w);
      } else {
        for (int j = 0; j < 8; ++j) w[j] = j < width ? weight_at(p, o * p.in + k0 + j) : 0.0f;
      }
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        if (r >= count) break;
        const float xv = load_as_float(p.x, p.dtype, (r0 + r) * p.out + o);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[r][j] += xv * w[j];
      }
    }
    for (int r = 0; r < count; ++r)
      for (int j = 0; j < width; ++j) store_from_float(p.y, p.dtype, (r0 + r) * p.in + k0 + j, acc[r][j]);
  }
}

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  DeviceBuffer(size_t count, const char* function) {
    check(cudaMalloc(&ptr, (count > 0 ? count : 1) * sizeof(T)), function, "cudaMalloc");
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

}  // namespace

void matmul_4bit_device(const void* x, Format dtype, int64_t rows, const uint8_t* packed, const float* absmax,
                        Format type, int64_t blocksize, int64_t out, int64_t in, const void* bias, void* y,
                        bool transposed, void* stream) {
  const char* fn = "cuda::matmul_4bit_device";
  if (rows == 0) return;
  const bool aligned = in % 8 == 0 && reinterpret_cast<uintptr_t>(packed) % 4 == 0;
  int shift = 0;
  while ((int64_t(1) << shift) < blocksize) ++shift;
  const Params params{codebook4(type), x, dtype, rows, packed, absmax, blocksize, out, in, bias, y, aligned, shift};
  const auto queue = static_cast<cudaStream_t>(stream);
  if (transposed) {
    const int threads = 128;
    const int64_t groups = (in + 7) / 8;
    transposed_kernel<<<unsigned((groups + threads - 1) / threads), threads, 0, queue>>>(params);
  } else {
    const int threads = 256;
    const int64_t warps = threads / 32;
    forward_kernel<<<unsigned((out + warps - 1) / warps), threads, 0, queue>>>(params);
  }
  check(cudaGetLastError(), fn, "kernel launch");
}

void matmul_4bit(const void* x, Format dtype, int64_t rows, const uint8_t* packed, const float* absmax, Format type,
                 int64_t blocksize, int64_t out, int64_t in, const void* bias, void* y, bool transposed) {
  const char* fn = "cuda::matmul_4bit";
  const size_t size = size_t(element_size(dtype));
  const int64_t n = out * in;
  const int64_t x_cols = transposed ? out : in, y_cols = transposed ? in : out;
  DeviceBuffer<char> d_x(size_t(rows * x_cols) * size, fn);
  DeviceBuffer<char> d_y(size_t(rows * y_cols) * size, fn);
  DeviceBuffer<uint8_t> d_packed(size_t((n + 1) / 2), fn);
  DeviceBuffer<float> d_absmax(size_t((n + blocksize - 1) / blocksize), fn);
  DeviceBuffer<char> d_bias(bias != nullptr ? size_t(y_cols) * size : 0, fn);
  check(cudaMemcpy(d_x.ptr, x, size_t(rows * x_cols) * size, cudaMemcpyHostToDevice), fn, "copy in");
  check(cudaMemcpy(d_packed.ptr, packed, size_t((n + 1) / 2), cudaMemcpyHostToDevice), fn, "copy in");
  check(cudaMemcpy(d_absmax.ptr, absmax, size_t((n + blocksize - 1) / blocksize) * sizeof(float),
                   cudaMemcpyHostToDevice),
        fn, "copy in");
  if (bias != nullptr) check(cudaMemcpy(d_bias.ptr, bias, size_t(y_cols) * size, cudaMemcpyHostToDevice), fn, "copy in");
  matmul_4bit_device(d_x.ptr, dtype, rows, d_packed.ptr, d_absmax.ptr, type, blocksize, out, in,
                     bias != nullptr ? d_bias.ptr : nullptr, d_y.ptr, transposed, nullptr);
  check(cudaDeviceSynchronize(), fn, "kernel");
  check(cudaMemcpy(y, d_y.ptr, size_t(rows * y_cols) * size, cudaMemcpyDeviceToHost), fn, "copy out");
}

}  // namespace halo::cuda
