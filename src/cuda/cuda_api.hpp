// Plain C++ face of the CUDA backend. The .cu files implement it when nvcc is
// found; cuda_absent.cpp implements it otherwise with a clear error. No CUDA or
// Python header is visible from here.
#pragma once

#include <cstdint>
#include <string>

#include "halo/core/convert.hpp"
#include "halo/optim/adamw8bit.hpp"

namespace halo::cuda {

bool compiled();
// "" when a device can run halo's kernels, else why not.
std::string unavailable_reason();

// Host pointers in, host pointers out; the device copies are internal.
void quantize_4bit(const void* input, Format dtype, int64_t n, Format type, int64_t blocksize,
                   uint8_t* packed, float* absmax);
void dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n, Format type,
                     int64_t blocksize, void* output, Format dtype);

// Device pointers in and out (torch CUDA tensors), queued on `stream` (a cudaStream_t
// as an integer; 0 is the legacy default stream). Nothing is copied to the host.
void quantize_4bit_device(const void* input, Format dtype, int64_t n, Format type, int64_t blocksize,
                          uint8_t* packed, float* absmax, uintptr_t stream);
void dequantize_4bit_device(const uint8_t* packed, const float* absmax, int64_t n, Format type, int64_t blocksize,
                            void* output, Format dtype, uintptr_t stream);
void adamw8bit_step_device(void* param, const void* grad, Format dtype, int64_t n, uint8_t* state1,
                           uint8_t* state2, float* absmax1, float* absmax2, const AdamW8bitSettings& settings,
                           uintptr_t stream);
// The 4-bit matmul (halo/quant/matmul4.hpp): y = x Wᵀ (+ bias), or with `transposed`
// y = x W, for W [out, in] in bitsandbytes' layout; x, bias, y of `dtype`.
// Host pointers in and out (the device copies are internal): the registry's cuda entry.
void matmul_4bit(const void* x, Format dtype, int64_t rows, const uint8_t* packed, const float* absmax, Format type,
                 int64_t blocksize, int64_t out, int64_t in, const void* bias, void* y, bool transposed);
// The same with every pointer in the memory of the current CUDA device, enqueued on
// `stream` (a cudaStream_t; nullptr = the default stream) without synchronizing.
// Launch errors are thrown; errors while the kernel runs surface at the next synchronization.
void matmul_4bit_device(const void* x, Format dtype, int64_t rows, const uint8_t* packed, const float* absmax,
                        Format type, int64_t blocksize, int64_t out, int64_t in, const void* bias, void* y,
                        bool transposed, void* stream);

}  // namespace halo::cuda
