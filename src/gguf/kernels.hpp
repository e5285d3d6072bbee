// Private interface between the conversion dispatch (convert.cpp) and the
// per-ISA quantization kernels. A kernel quantizes `blocks` whole blocks and
// must give the scalar reference's bytes exactly.
#pragma once

#include <cstdint>

#include "halo/backend/backend.hpp"
#include "halo/gguf/convert.hpp"

namespace halo::gguf::kernels {

using QuantizeKernel = void (*)(const float* in, void* out, int64_t blocks);

void quantize_q8_0_avx512(const float* in, void* out, int64_t blocks);
void quantize_q4_0_avx512(const float* in, void* out, int64_t blocks);
void quantize_q5_0_avx512(const float* in, void* out, int64_t blocks);
void quantize_q4_k_avx512(const float* in, void* out, int64_t blocks);
void quantize_q5_k_avx512(const float* in, void* out, int64_t blocks);
void quantize_q6_k_avx512(const float* in, void* out, int64_t blocks);

void quantize_q8_0_avx2(const float* in, void* out, int64_t blocks);
void quantize_q4_0_avx2(const float* in, void* out, int64_t blocks);
void quantize_q5_0_avx2(const float* in, void* out, int64_t blocks);
void quantize_q4_k_avx2(const float* in, void* out, int64_t blocks);
void quantize_q5_k_avx2(const float* in, void* out, int64_t blocks);
void quantize_q6_k_avx2(const float* in, void* out, int64_t blocks);

}  // namespace halo::gguf::kernels
