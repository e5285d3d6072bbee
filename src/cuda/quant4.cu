// CUDA 4-bit kernels. The per-block arithmetic is halo/quant/block.hpp, shared
// with the CPU reference (and tested there); this file only maps blocks to
// threads and moves memory.
#include <cuda_runtime.h>

#include <string>

#include "halo/core/error.hpp"
#include "halo/quant/block.hpp"
#include "src/cuda/cuda_api.hpp"
#include "src/cuda/quant4_kernels.cuh"

namespace halo::cuda {
namespace {

void check(cudaError_t status, const char* function, const char* what) {
  if (status != cudaSuccess)
    fail<BackendUnavailable>(function, what, ": ", cudaGetErrorString(status));
}

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  DeviceBuffer(size_t count, const char* function) { check(cudaMalloc(&ptr, count * sizeof(T)), function, "cudaMalloc"); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

}  // namespace

bool compiled() { return true; }

std::string unavailable_reason() {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) return std::string("no usable CUDA device: ") + cudaGetErrorString(status);
  if (count == 0) return "no CUDA device";
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return "cannot query CUDA device 0";
  if (prop.major < 8) return "CUDA device 0 is older than sm_80";
  return "";
}

void quantize_4bit(const void* input, Format dtype, int64_t n, Format type, int64_t blocksize, uint8_t* packed,
                   float* absmax) {
  const char* fn = "cuda::quantize_4bit";
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  DeviceBuffer<char> d_input(size_t(n) * element_size(dtype), fn);
  DeviceBuffer<uint8_t> d_packed(size_t((n + 1) / 2), fn);
  DeviceBuffer<float> d_absmax(size_t(blocks), fn);
  check(cudaMemcpy(d_input.ptr, input, size_t(n) * element_size(dtype), cudaMemcpyHostToDevice), fn, "copy in");
  const int threads = 128;
  quantize_kernel<<<unsigned((blocks + threads - 1) / threads), threads>>>(
      codebook4(type), d_input.ptr, dtype, n, blocksize, d_packed.ptr, d_absmax.ptr);
  check(cudaGetLastError(), fn, "kernel launch");
  check(cudaMemcpy(packed, d_packed.ptr, size_t((n + 1) / 2), cudaMemcpyDeviceToHost), fn, "copy out");
  check(cudaMemcpy(absmax, d_absmax.ptr, size_t(blocks) * sizeof(float), cudaMemcpyDeviceToHost), fn, "copy out");
}

void dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n, Format type, int64_t blocksize,
                     void* output, Format dtype) {
  const char* fn = "cuda::dequantize_4bit";
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  DeviceBuffer<uint8_t> d_packed(size_t((n + 1) / 2), fn);
  DeviceBuffer<float> d_absmax(size_t(blocks), fn);
  DeviceBuffer<char> d_output(size_t(n) * element_size(dtype), fn);
  check(cudaMemcpy(d_packed.ptr, packed, size_t((n + 1) / 2), cudaMemcpyHostToDevice), fn, "copy in");
  check(cudaMemcpy(d_absmax.ptr, absmax, size_t(blocks) * sizeof(float), cudaMemcpyHostToDevice), fn, "copy in");
  const int threads = 256;
  const int64_t grid = (n + threads - 1) / threads < 65535 * 8 ? (n + threads - 1) / threads : 65535 * 8;
  dequantize_kernel<<<unsigned(grid), threads>>>(codebook4(type), d_packed.ptr, d_absmax.ptr, n,
                                                 blocksize, d_output.ptr, dtype);
  check(cudaGetLastError(), fn, "kernel launch");
  check(cudaMemcpy(output, d_output.ptr, size_t(n) * element_size(dtype), cudaMemcpyDeviceToHost), fn, "copy out");
}

}  // namespace halo::cuda
