// LoRA linear layer forward and backward on the CPU:
//   y = x W^T (+ bias) + scaling * (drop(x) A^T) B^T
// with W [out, in] (or stored [in, out] when fan_in_fan_out, GPT-2's Conv1D),
// A [r, in], B [out, r], x [rows, in] row-major. W may be float32, float16,
// bfloat16, float64 or a 4-bit NF4/FP4 tensor in bitsandbytes' layout; the
// 4-bit base is dequantized tile by tile into a small float buffer inside the
// GEMM, never as a whole. Kernels exist for float and double activations (the
// double ones let gradient checks run on the very same code).
//
// Dropout is a deterministic function of (seed, flat element index of x): see
// dropout_keep below. Backward recomputes the mask from the same seed, so no
// mask needs to be stored between the passes.
#pragma once

#include <cstdint>

#include <vector>

#include "halo/backend/backend.hpp"
#include "halo/quant/codebook4.hpp"
#include "halo/quant/quant4.hpp"

namespace halo::lora {

// A non-owning view of the frozen base weight.
struct BaseWeight {
  // float32, float16, bfloat16, float64, or a bnb 4-bit format (nf4 / fp4).
  Format storage = Format::f32;
  int64_t out_features = 0;
  int64_t in_features = 0;
  bool fan_in_fan_out = false;  // stored [in, out] instead of [out, in]
  const void* data = nullptr;   // dense storage: out*in elements
  // 4-bit storage: packed codes (two per byte, bitsandbytes order) and float32
  // absmax per block (decode nested statistics first with double_dequantize).
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;
  int64_t blocksize = 64;
  Backend backend = Backend::automatic;  // 4-bit tile dequantization kernel
};

// A view of a 2-D Quantized4 ([out, in], or [in, out] with fan_in_fan_out) as a
// LoRA base. Plain absmax is used in place; nested (double-quantized) absmax is
// decoded with double_dequantize into `absmax_storage`, which must outlive the view.
BaseWeight quant4_base(const Quantized4& tensor, bool fan_in_fan_out, std::vector<float>& absmax_storage,
                       Backend backend = Backend::automatic);

struct LoraSpec {
  int64_t rank = 0;
  double scaling = 1.0;  // alpha / r, or alpha / sqrt(r) with rsLoRA (see lora_scaling)
  double dropout = 0.0;  // probability of zeroing an input element of the LoRA branch, in [0, 1)
  uint64_t seed = 0;     // dropout seed; the same seed gives the same mask
};

// alpha / r, or alpha / sqrt(r) with rsLoRA.
double lora_scaling(double alpha, int64_t rank, bool rslora);

// Dropout RNG: element i of x (flat row-major index) is kept when
//   splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15) >> 40   (a 24-bit integer u)
// satisfies u >= ceil(p * 2^24); kept elements are scaled by 1 / (1 - p).
// splitmix64 is Vigna's finaliser: z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
// z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31.
bool dropout_keep(uint64_t seed, int64_t index, double p);
// mask[i] = dropout_keep(seed, i, p) ? 1 / (1 - p) : 0 for i in [0, count).
void dropout_mask(uint64_t seed, int64_t count, double p, float* mask);

// y [rows, out]. bias (out) may be null.
template <typename Scalar>
void lora_forward(const Scalar* x, int64_t rows, const BaseWeight& base, const Scalar* lora_a, const Scalar* lora_b,
                  const Scalar* bias, const LoraSpec& spec, Scalar* y);

// Gradients for x [rows, in], A [r, in], B [out, r] and (when grad_bias is not
// null) bias [out]. Any of grad_x / grad_a / grad_b may be null to skip it.
template <typename Scalar>
void lora_backward(const Scalar* grad_y, const Scalar* x, int64_t rows, const BaseWeight& base, const Scalar* lora_a,
                   const Scalar* lora_b, const LoraSpec& spec, Scalar* grad_x, Scalar* grad_a, Scalar* grad_b,
                   Scalar* grad_bias);

extern template void lora_forward<float>(const float*, int64_t, const BaseWeight&, const float*, const float*,
                                         const float*, const LoraSpec&, float*);
extern template void lora_forward<double>(const double*, int64_t, const BaseWeight&, const double*, const double*,
                                          const double*, const LoraSpec&, double*);
extern template void lora_backward<float>(const float*, const float*, int64_t, const BaseWeight&, const float*,
                                          const float*, const LoraSpec&, float*, float*, float*, float*);
extern template void lora_backward<double>(const double*, const double*, int64_t, const BaseWeight&, const double*,
                                           const double*, const LoraSpec&, double*, double*, double*, double*);

}  // namespace halo::lora
