// The int8-activation 4-bit matmul's plain pieces: the int8 code books, x's quantization
// and the SIMD layout of x, and the scalar reference the SIMD kernels are tested against
// (written as plainly as possible: one float32 sum per output in ascending order of k).
#include <algorithm>
#include <cmath>
#include <limits>

#include "halo/quant/block.hpp"
#include "halo/quant/codebook4.hpp"
#include "src/quant/matmul4_q8.hpp"

namespace halo::kernels {

static_assert(kQ8Block % 8 == 0 && 64 % kQ8Block == 0, "an int32 lane of the kernels must lie in one sub-block");

namespace {
Q8Codebook make_codebook(Format type, float scale) {
  Q8Codebook book{};
  const Codebook4& code = codebook4(type);
  for (int i = 0; i < 16; ++i) book.code[i] = int8_t(std::nearbyint(code.code[size_t(i)] * scale));
  book.inv_scale = 1.0f / scale;
  return book;
}
}  // namespace

const Q8Codebook& q8_codebook(Format type) {
  // S = 127 for NF4 (codes in [-1, 1], max error 0.0037 of absmax); S = 120 for FP4, whose
  // codes are multiples of 1/12 but for +-1/192 (so all others are exact).
  static const Q8Codebook nf4 = make_codebook(Format::nf4, 127.0f), fp4 = make_codebook(Format::fp4, 120.0f);
  return type == Format::fp4 ? fp4 : nf4;
}

void quantize_q8(const float* x, int64_t rows, int64_t in, int8_t* q, float* d) {
  const int64_t blocks = q8_subblocks(in);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t s = 0; s < blocks; ++s) {
      const int64_t k0 = s * kQ8Block, k1 = std::min(in, k0 + kQ8Block);
      const float* src = x + r * in;
      float amax = 0.0f;
      bool finite = true;
      for (int64_t k = k0; k < k1; ++k) {
        finite = finite && std::isfinite(src[k]);
        amax = std::max(amax, std::fabs(src[k]));
      }
      float scale = amax / 127.0f;
      float inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
      if (!finite) {
        scale = std::numeric_limits<float>::quiet_NaN();
        inverse = 0.0f;
      } else if (!std::isfinite(inverse)) {  // |x| < 2^-126 * 127: dropped
        scale = inverse = 0.0f;
      }
      d[r * blocks + s] = scale;
      for (int64_t k = k0; k < k1; ++k) {
        const float v = finite ? std::nearbyint(src[k] * inverse) : 0.0f;
        q[r * in + k] = int8_t(std::clamp(v, -127.0f, 127.0f));
      }
    }
}

void pack_q8(const int8_t* q, const float* d, int64_t rows, int64_t in, int lanes, std::byte* out) {
  const int64_t chunks = in / 64, blocks = q8_subblocks(in), bytes = q8_chunk_bytes(lanes);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* src = q + r * in + c * 64;
      std::byte* dst = out + (c * rows + r) * bytes;
      int8_t order[64];
      for (int j = 0; j < 32; ++j) {
        order[j] = src[2 * j + 1];  // low nibble of weight byte j
        order[32 + j] = src[2 * j];  // its high nibble
      }
      float scale[16];
      int32_t offset[16] = {};
      for (int b = 0; b < 64; ++b) {
        const int lane = (b / 4) % lanes;
        const int64_t element = b < 32 ? 2 * b + 1 : 2 * (b - 32);  // within the chunk
        scale[lane] = d[r * blocks + (c * 64 + element) / kQ8Block];
        offset[lane] -= kQ8Offset * order[b];
      }
      std::copy(order, order + 64, reinterpret_cast<int8_t*>(dst));
      std::copy(scale, scale + lanes, reinterpret_cast<float*>(dst + 64));
      std::copy(offset, offset + lanes, reinterpret_cast<int32_t*>(dst + 64 + 4 * lanes));
    }
}

void matmul4_q8_reference(const Q8Weight& w, const int8_t* q, const float* d, int64_t rows, int64_t o_begin,
                          int64_t o_end, float* y, int64_t ldy) {
  const int64_t blocks = q8_subblocks(w.in);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = o_begin; o < o_end; ++o) {
      float sum = 0.0f;
      for (int64_t s = 0; s < blocks; ++s) {
        const int64_t k1 = std::min(w.in, (s + 1) * kQ8Block);
        for (int64_t k = s * kQ8Block; k < k1;) {  // one piece per 4-bit block the sub-block touches
          const int64_t block = (o * w.in + k) >> w.block_shift;
          const int64_t end = std::min(k1, ((block + 1) << w.block_shift) - o * w.in);
          int32_t dot = 0;
          for (; k < end; ++k) dot += int32_t(q[r * w.in + k]) * w.code[code_at(w.packed, o * w.in + k)];
          sum += float(dot) * (d[r * blocks + s] * (w.absmax[block] * w.inv_scale));
        }
      }
      y[r * ldy + o] = sum;
    }
}

}  // namespace halo::kernels
