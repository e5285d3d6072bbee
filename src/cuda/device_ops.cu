// 4-bit kernels on device pointers for torch CUDA tensors: the block logic is
// halo/quant/block.hpp (shared with the CPU reference); this file maps blocks
// to threads on the caller's stream. Nothing is copied to or from the host.
#include <cuda_runtime.h>

#include "halo/core/error.hpp"
#include "halo/quant/block.hpp"
#include "src/cuda/cuda_api.hpp"

namespace halo::cuda {
namespace {

void check_launch(const char* function) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) fail<BackendUnavailable>(function, "kernel launch: ", cudaGetErrorString(status));
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

__global__ void quantize_blocks(Codebook4 format, const void* input, Format dtype, int64_t n, int64_t blocksize,
                                uint8_t* packed, float* absmax) {
  const int64_t block = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t begin = block * blocksize;
  if (begin >= n) return;
  const int64_t end = begin + blocksize < n ? begin + blocksize : n;
  quantize4_block(format, input, dtype, begin, end, end - begin < blocksize, packed, absmax + block);
}

__global__ void dequantize_values(Codebook4 format, const uint8_t* packed, const float* absmax, int64_t n,
                                  int64_t blocksize, void* output, Format dtype) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    store_from_float(output, dtype, i, dequantize4_value(format, packed, absmax, blocksize, i));
}

}  // namespace

void quantize_4bit_device(const void* input, Format dtype, int64_t n, Format type, int64_t blocksize,
                          uint8_t* packed, float* absmax, uintptr_t stream) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int threads = 128;
  quantize_blocks<<<unsigned((blocks + threads - 1) / threads), threads, 0, as_stream(stream)>>>(
      codebook4(type), input, dtype, n, blocksize, packed, absmax);
  check_launch("cuda::quantize_4bit_device");
}

void dequantize_4bit_device(const uint8_t* packed, const float* absmax, int64_t n, Format type, int64_t blocksize,
                            void* output, Format dtype, uintptr_t stream) {
  const int threads = 256;
  const int64_t wanted = (n + threads - 1) / threads;
  const int64_t grid = wanted < 65535 * 8 ? wanted : 65535 * 8;
  dequantize_values<<<unsigned(grid), threads, 0, as_stream(stream)>>>(codebook4(type), packed, absmax, n,
                                                                       blocksize, output, dtype);
  check_launch("cuda::dequantize_4bit_device");
}

}  // namespace halo::cuda
