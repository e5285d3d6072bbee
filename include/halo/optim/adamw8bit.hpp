// bitsandbytes' 8-bit AdamW (AdamW8bit / PagedAdamW8bit) on blockwise 8-bit states.
//
// Each parameter tensor of n elements keeps two uint8 states in blocks of 256
// elements: state1 (first moment) as codes of the signed dynamic map, state2
// (second moment) as codes of the unsigned dynamic map, each with one float32
// absmax per block (bitsandbytes' layout, so states can be compared and moved).
// A step decodes a block, runs decoupled-weight-decay Adam in float32, updates
// the parameter from the float32 moments and re-encodes them to the nearest code
// of the block's new absmax. Backends: scalar (the reference), AVX2, AVX-512
// (the same kernel written once against xsimd), CUDA (device pointers).
#pragma once

#include <array>
#include <cstdint>

#include "halo/backend/backend.hpp"
#include "halo/core/format.hpp"

namespace halo {

inline constexpr int64_t kOptimizerBlocksize = 256;

struct AdamW8bitSettings {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 1e-2f;
  int64_t step = 1;          // 1 for the first update (bias corrections)
  float gnorm_scale = 1.0f;  // gradients are multiplied by this first
};

// bitsandbytes' create_dynamic_map(signed=False): 256 ascending float32 values in [0, 1].
const std::array<float, 256>& dynamic_map_unsigned();

// One AdamW step over n elements. param and grad are of `dtype` (float32, float16 or
// bfloat16); state1/state2 hold n codes; absmax1/absmax2 hold ceil(n / 256) floats.
void adamw8bit_step(void* param, const void* grad, Format dtype, int64_t n, uint8_t* state1, uint8_t* state2,
                    float* absmax1, float* absmax2, const AdamW8bitSettings& settings,
                    Backend backend = Backend::automatic);

// The same on the current CUDA device: every pointer in its memory, queued on `stream`
// (a cudaStream_t as an integer) without synchronizing. BackendUnavailable without CUDA.
void adamw8bit_step_device(void* param, const void* grad, Format dtype, int64_t n, uint8_t* state1, uint8_t* state2,
                           float* absmax1, float* absmax2, const AdamW8bitSettings& settings, uintptr_t stream);

// Validation shared by both entries (throws InvalidArgument naming `function`).
void check_adamw8bit(const char* function, Format dtype, int64_t n, const AdamW8bitSettings& settings);

}  // namespace halo
