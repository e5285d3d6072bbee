// Body of the SIMD 4-bit kernels, written once against an ISA adapter.
//
// Included by exactly one translation unit per ISA (quant4_avx2.cpp,
// quant4_avx512.cpp), after that unit defines `Isa` with:
//   using arch = xsimd::<tag>;                       W = batch<float, arch>::size
//   static batch load(const void* src, Format, i)     W elements as float32
//   static void pack(const batch& scaled, const Codebook4&, uint8_t* out)   W/2 bytes
//   static void dequant(const uint8_t* bytes, const float* table, float scale, Format, void* out, i)
//                                                    2W elements from W bytes
// The short last block, unaligned heads and tails go to the scalar reference.
#pragma once

namespace halo::kernels {
namespace {

using batch = xsimd::batch<float, Isa::arch>;
constexpr int64_t kWidth = int64_t(batch::size);

inline float horizontal_max(const batch& v) {
  alignas(64) float lanes[kWidth];
  v.store_aligned(lanes);
  float best = lanes[0];
  for (int64_t i = 1; i < kWidth; ++i) best = lanes[i] > best ? lanes[i] : best;
  return best;
}

inline void quantize_full_block(const Quant4Job& job, int64_t block) {
  const int64_t begin = block * job.blocksize;
  const int64_t end = begin + job.blocksize;
  batch running = batch(0.0f);
  auto nan_seen = batch(0.0f) != batch(0.0f);
  for (int64_t i = begin; i < end; i += kWidth) {
    batch v = Isa::load(job.input, job.dtype, i);
    nan_seen = nan_seen | xsimd::isnan(v);
    running = xsimd::max(running, xsimd::abs(v));
  }
  float found = xsimd::any(nan_seen) ? __builtin_nanf("") : horizontal_max(running);
  job.absmax[block] = found;
  const float floor = (found > kAbsmaxFloor || found != found) ? found : kAbsmaxFloor;
  const batch inverse = batch(1.0f / floor);
  for (int64_t i = begin; i < end; i += kWidth)
    Isa::pack(Isa::load(job.input, job.dtype, i) * inverse, *job.format, job.packed + i / 2);
}

inline void quantize_blocks(const Quant4Job& job, int64_t block_begin, int64_t block_end) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    if ((b + 1) * job.blocksize > job.n)
      quantize4_scalar(job, b, b + 1);
    else
      quantize_full_block(job, b);
  }
}

inline void dequantize_range(const Dequant4Job& job, int64_t begin, int64_t end, void* output) {
  constexpr int64_t step = 2 * kWidth;  // elements per Isa::dequant call; divides every block size
  const int64_t size = job.dtype == Format::f32 ? 4 : 2;
  auto* out = static_cast<char*>(output);
  int64_t head_end = (begin + step - 1) / step * step;
  if (head_end > end) head_end = end;
  if (head_end > begin) dequantize4_scalar(job, begin, head_end, out);
  int64_t i = head_end;
  for (; i + step <= end; i += step)
    Isa::dequant(job.packed + i / 2, job.format->code.data(), job.absmax[i / job.blocksize], job.dtype,
                 out + (i - begin) * size);
  if (i < end) dequantize4_scalar(job, i, end, out + (i - begin) * size);
}

}  // namespace
}  // namespace halo::kernels
