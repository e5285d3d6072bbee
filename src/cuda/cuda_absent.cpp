// The CUDA backend in a build made without nvcc: every entry point explains why
// it cannot run.
#include "halo/core/error.hpp"
#include "src/cuda/cuda_api.hpp"

namespace halo::cuda {
namespace {
[[noreturn]] void absent(const char* function) {
  fail<BackendUnavailable>(function, "halo was built without CUDA (nvcc was not found at build time, or HALO_CUDA=OFF)");
}
}  // namespace

bool compiled() { return false; }
std::string unavailable_reason() { return "halo was built without CUDA"; }

void quantize_4bit(const void*, Format, int64_t, Format, int64_t, uint8_t*, float*) { absent("cuda::quantize_4bit"); }
void dequantize_4bit(const uint8_t*, const float*, int64_t, Format, int64_t, void*, Format) {
  absent("cuda::dequantize_4bit");
}
void matmul_4bit(const void*, Format, int64_t, const uint8_t*, const float*, Format, int64_t, int64_t, int64_t,
                 const void*, void*, bool) {
  absent("cuda::matmul_4bit");
}
void matmul_4bit_device(const void*, Format, int64_t, const uint8_t*, const float*, Format, int64_t, int64_t, int64_t,
                        const void*, void*, bool, void*) {
  absent("cuda::matmul_4bit_device");
}

void quantize_4bit_device(const void*, Format, int64_t, Format, int64_t, uint8_t*, float*, uintptr_t) {
  absent("cuda::quantize_4bit_device");
}
void dequantize_4bit_device(const uint8_t*, const float*, int64_t, Format, int64_t, void*, Format, uintptr_t) {
  absent("cuda::dequantize_4bit_device");
}
void adamw8bit_step_device(void*, const void*, Format, int64_t, uint8_t*, uint8_t*, float*, float*,
                           const AdamW8bitSettings&, uintptr_t) {
  absent("cuda::adamw8bit_step_device");
}

}  // namespace halo::cuda
