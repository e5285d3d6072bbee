// Plain C++ face of the CUDA backend. The .cu files implement it when nvcc is
// found; cuda_absent.cpp implements it otherwise with a clear error. No CUDA or
// Python header is visible from here.
#pragma once

#include <cstdint>
#include <string>

#include "halo/core/convert.hpp"

namespace halo::cuda {

bool compiled();
// "" when a device can run halo's kernels, else why not.
std::string unavailable_reason();

// Host pointers in, host pointers out; the device copies are internal.
void quantize_4bit(const void* input, Format dtype, int64_t n, Format type, int64_t blocksize,
                   uint8_t* packed, float* absmax);
void dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n, Format type,
                     int64_t blocksize, void* output, Format dtype);

}  // namespace halo::cuda
