// The 4-bit quantize/dequantize kernels, shared by the host-memory entry points
// (quant4.cu) and the device-pointer ones (device_ops.cu). The per-block arithmetic
// is halo/quant/block.hpp, shared with the CPU reference; these only map blocks to
// threads. Each including file gets its own copy (no relocatable device code).
#pragma once

#include <cuda_runtime.h>

#include "halo/quant/block.hpp"

namespace halo::cuda {
namespace {

// One thread per block: blocks are small (32..4096 elements) and many.
__global__ void quantize_kernel(Codebook4 format, const void* input, Format dtype, int64_t n, int64_t blocksize,
                                uint8_t* packed, float* absmax) {
  const int64_t block = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t begin = block * blocksize;
  if (begin >= n) return;
  const int64_t end = begin + blocksize < n ? begin + blocksize : n;
  quantize4_block(format, input, dtype, begin, end, end - begin < blocksize, packed, absmax + block);
}

__global__ void dequantize_kernel(Codebook4 format, const uint8_t* packed, const float* absmax, int64_t n,
                                  int64_t blocksize, void* output, Format dtype) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    store_from_float(output, dtype, i, dequantize4_value(format, packed, absmax, blocksize, i));
}

}  // namespace
}  // namespace halo::cuda
