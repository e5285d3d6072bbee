// Private interface between the 4-bit dispatch (quant4.cpp) and the per-ISA
// kernels. Per-ISA translation units include only this header and xsimd, so no
// inline function compiled with AVX flags can leak into scalar code.
#pragma once

#include <cstdint>

#include "halo/core/convert.hpp"
#include "halo/quant/codebook4.hpp"

namespace halo::kernels {

struct Quant4Job {
  const void* input;
  Format dtype;
  int64_t n;
  int64_t blocksize;
  const Codebook4* format;
  uint8_t* packed;
  float* absmax;
};

// Quantizes blocks [block_begin, block_end).
void quantize4_scalar(const Quant4Job& job, int64_t block_begin, int64_t block_end);
void quantize4_avx2(const Quant4Job& job, int64_t block_begin, int64_t block_end);
void quantize4_avx512(const Quant4Job& job, int64_t block_begin, int64_t block_end);

struct Dequant4Job {
  const uint8_t* packed;
  const float* absmax;
  int64_t blocksize;
  const Codebook4* format;
  Format dtype;
};

// Elements [begin, end) into output[0, end - begin) (output is of job.dtype).
void dequantize4_scalar(const Dequant4Job& job, int64_t begin, int64_t end, void* output);
void dequantize4_avx2(const Dequant4Job& job, int64_t begin, int64_t end, void* output);
void dequantize4_avx512(const Dequant4Job& job, int64_t begin, int64_t end, void* output);

}  // namespace halo::kernels
