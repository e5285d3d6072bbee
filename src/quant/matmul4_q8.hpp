// Private interface of the 4-bit matmul with int8 activations (activations = int8 in
// halo/quant/matmul4.hpp), between its dispatch (matmul4.cpp, plain C++), the plain
// pieces and scalar reference (matmul4_q8_scalar.cpp) and the per-ISA dot-product kernels
// (matmul4_q8_{avx2,avxvnni,avx512,avx512vnni}.cpp through matmul4_q8_simd.hpp).
//
// The scheme (llama.cpp's Q8 activation blocks over bitsandbytes' 4-bit layout):
//  - x, per row and per 8 consecutive elements (a sub-block; the last may be shorter):
//    d = max|x| / 127, q = nearest-even(x * (1 / d)) in [-127, 127] (q = 0 when d = 0; a
//    sub-block holding NaN or Inf gets d = NaN, so its row's outputs are NaN);
//  - W: each code as int8, round(code * S) (S = 127 for NF4, 120 for FP4: all FP4 codes but
//    +-1/192 are then exact), its weight code * absmax taken as int8 * (absmax * (1 / S));
//  - y[r, o] = sum over sub-blocks s (and, where a 4-bit block boundary cuts s, over its
//    pieces) of float(sum_k q[k] * code8[k]) * (d_s * (absmax_b * (1 / S))), in float32.
// Sub-blocks of 8, not llama.cpp's 32: every int32 lane of the SIMD kernels sums the products
// of 8 consecutive elements anyway and is scaled on its own, so a finer step for x costs the
// kernels nothing. Measured on SmolLM2's layer inputs (NF4 weights): the relative error of x's
// int8 step alone is 0.29-0.85 % with sub-blocks of 32 and 0.14-0.49 % with 8; the int8 code
// book adds 0.22-0.68 %; SmolLM2's perplexity rose 1.04 % (float32) and 1.23 % (bfloat16) with 32.
#pragma once

#include <cstddef>
#include <cstdint>

#include "halo/core/format.hpp"

namespace halo::kernels {

inline constexpr int64_t kQ8Block = 8;  // elements of x per int8 scale (a multiple of 8: see pack_q8)
inline constexpr int kQ8Offset = 128;    // VNNI kernels look weights up as code8 + 128 (unsigned)

// A 4-bit format's code book as int8 (code8[i] = round(code[i] * S)) and 1 / S.
struct Q8Codebook {
  int8_t code[16];
  float inv_scale;
};
const Q8Codebook& q8_codebook(Format type);

// The weight as the int8 kernels read it.
struct Q8Weight {
  const uint8_t* packed;
  const float* absmax;
  const int8_t* code;  // 16 int8 code values
  float inv_scale;     // weight = code * absmax * inv_scale
  int64_t blocksize;
  int64_t out, in;     // W is [out, in]
  int block_shift;     // log2(blocksize)
};

// x [rows, in] (float32) -> q [rows, in] and d [rows, q8_subblocks(in)], as described above.
inline int64_t q8_subblocks(int64_t in) { return (in + kQ8Block - 1) / kQ8Block; }
void quantize_q8(const float* x, int64_t rows, int64_t in, int8_t* q, float* d);

// y[r * ldy + o] = the scheme's sum for o in [o_begin, o_end), r < rows (the reference:
// any shape, one float32 sum per output in ascending order of k).
void matmul4_q8_reference(const Q8Weight& w, const int8_t* q, const float* d, int64_t rows, int64_t o_begin,
                          int64_t o_end, float* y, int64_t ldy);

// The SIMD kernels read x (in % 64 == 0) in 64-element chunks, the chunk c of row r at
// x + (c * rows + r) * q8_chunk_bytes(lanes):
//   64 int8: the odd elements of sub-block 2c, those of 2c + 1, then the even ones of 2c and of
//            2c + 1 (the order in which a chunk's 32 weight bytes yield their low and high nibbles);
//   `lanes` float32: d of the sub-block each int32 lane of the kernel's sums belongs to (a lane
//                    takes the products of 8 consecutive elements, 8j..8j+7 of the chunk, or for
//                    lanes = 16 and j >= 8, the even ones of 8(j-8)..8(j-8)+7 and the odd ones for j < 8);
//   `lanes` int32:   -128 * the sum of the q that lane's products take (VNNI kernels start their
//                    sums there, so the +128 of the unsigned weights cancels exactly).
// lanes = 8 (ymm: lane j sums bytes 4j..4j+3 of both 32-byte halves) or 16 (zmm: bytes 4j..4j+3).
inline constexpr int64_t q8_chunk_bytes(int lanes) { return 64 + 8 * int64_t(lanes); }
void pack_q8(const int8_t* q, const float* d, int64_t rows, int64_t in, int lanes, std::byte* out);

// What one entry of the int8 table provides (the scalar entry: none).
struct Matmul4Q8Ops {
  int max_rows;  // rows of x per pass
  int lanes;     // of pack_q8's layout
  // y[r * ldy + o] for o in [o_begin, o_end), r < rows; needs in % 64 == 0 and blocksize >= 64.
  void (*gemv)(const Q8Weight& w, const std::byte* x, int64_t rows, int64_t o_begin, int64_t o_end, float* y,
               int64_t ldy);
};

extern const Matmul4Q8Ops kMatmul4Q8Avx2;        // vpmaddubsw (sign trick)
extern const Matmul4Q8Ops kMatmul4Q8AvxVnni;     // AVX-VNNI vpdpbusd on ymm (offset trick)
extern const Matmul4Q8Ops kMatmul4Q8Avx512;      // AVX512-BW vpmaddubsw (sign trick)
extern const Matmul4Q8Ops kMatmul4Q8Avx512Vnni;  // AVX512-VNNI vpdpbusd (offset trick)

}  // namespace halo::kernels
