// Float32 sum and mean in PyTorch's CPU summation order.
//
// Why: bitsandbytes' double quantization stores the offset `absmax.mean()`,
// computed by torch on the CPU, and subtracts it from every absmax before the
// second-level quantization. To produce byte-identical quantized state we must
// reproduce that float32 value bit for bit, and float addition is not
// associative, so the ORDER of the additions has to be torch's:
//
//   * the cascade ("multi-level accumulator") sum of ATen's CPU sum kernel,
//     run over Vectorized<float> lanes with 4 independent accumulators, then a
//     scalar tail, then a left-to-right sum of the lanes;
//   * for n >= 32768 and num_threads > 1, the two-pass parallel reduction of
//     TensorIterator: at::parallel_for (OpenMP backend) splits [0, n) into
//     chunks of divup(n, min(num_threads, divup(n, 32768))) elements, each
//     chunk is cascade-summed into its own slot of a num_threads-long buffer
//     of zeros, and the buffer is then cascade-summed the same way;
//   * mean = sum / float(n) (one float32 division, as ATen's CPU mean does).
//
// The implementation is our own, written from the order documented in
// PyTorch's sources; no PyTorch code is used. Nothing here runs in parallel:
// num_threads only selects the order.
//
// Vector width: ATen's CPU sum kernel is not dispatched at AVX512 level (the
// AVX512 build falls back to AVX2), so on every x86-64 CPU capability
// (DEFAULT, AVX2, AVX512) torch sums float32 with 8-lane vectors; the default
// below is therefore 8. On aarch64 builds Vectorized<float> is 4 lanes (NEON)
// and may differ again under SVE: use torch_sum_f32_width() with the width
// that matches the torch build you compare against.
#pragma once

#include <cstdint>

namespace halo {

// Vectorized<float>::size() used by torch's CPU sum kernel on x86-64.
inline constexpr int kTorchSumVecWidth = 8;

// Sum of n float32 values in exactly the order PyTorch 2.x's CPU sum kernel uses for a contiguous
// 1-D tensor when it runs on `num_threads` intra-op threads (torch.get_num_threads()).
float torch_sum_f32(const float* data, int64_t n, int num_threads = 1);

// torch's mean: the sum above divided by n in float32, as ATen does it.
// n == 0 gives NaN (0 / 0), like torch.
float torch_mean_f32(const float* data, int64_t n, int num_threads = 1);

// As torch_sum_f32, for a torch build whose float vector has `vec_width`
// lanes. Supported widths: 4, 8, 16; anything else throws
// halo::InvalidArgument.
float torch_sum_f32_width(const float* data, int64_t n, int num_threads, int vec_width);

}  // namespace halo
