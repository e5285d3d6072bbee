// 4-bit kernels on device pointers for torch CUDA tensors: the block logic is
// halo/quant/block.hpp (shared with the CPU reference); this file maps blocks
// to threads on the caller's stream. Nothing is copied to or from the host.
#include <cuda_runtime.h>

#include "halo/core/error.hpp"
#include "halo/quant/block.hpp"
#include "src/cuda/cuda_api.hpp"
#include "src/cuda/quant4_kernels.cuh"

namespace halo::cuda {
namespace {

void check_launch(const char* function) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) fail<BackendUnavailable>(function, "kernel launch: ", cudaGetErrorString(status));
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace

void quantize_4bit_device(const void* input, Format dtype, int64_t n, Format type, int64_t blocksize,
                          uint8_t* packed, float* absmax, uintptr_t stream) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int threads = 128;
  quantize_kernel<<<unsigned((blocks + threads - 1) / threads), threads, 0, as_stream(stream)>>>(
      codebook4(type), input, dtype, n, blocksize, packed, absmax);
  check_launch("cuda::quantize_4bit_device");
}

void dequantize_4bit_device(const uint8_t* packed, const float* absmax, int64_t n, Format type, int64_t blocksize,
                            void* output, Format dtype, uintptr_t stream) {
  const int threads = 256;
  const int64_t wanted = (n + threads - 1) / threads;
  const int64_t grid = wanted < 65535 * 8 ? wanted : 65535 * 8;
  dequantize_kernel<<<unsigned(grid), threads, 0, as_stream(stream)>>>(codebook4(type), packed, absmax, n,
                                                                       blocksize, output, dtype);
  check_launch("cuda::dequantize_4bit_device");
}

}  // namespace halo::cuda
