// Blockwise 4-bit (NF4 / FP4) quantization in bitsandbytes' layout, and the
// 8-bit double quantization of its absmax ("nested" statistics).
//
// Layout: the tensor is flattened; block b covers elements [b*blocksize,
// (b+1)*blocksize), the last block may be short; absmax is float32 per block;
// two codes per byte, the first element of each pair in the high nibble, an odd
// element count padded with the code of 0. Results are bit-exact with
// bitsandbytes 0.50 on the CPU (see docs/quantization.md for the edge cases).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "halo/backend/backend.hpp"
#include "halo/core/convert.hpp"
#include "halo/quant/codebook4.hpp"

namespace halo {

constexpr int64_t num_blocks(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }
constexpr int64_t packed_size(int64_t n) { return (n + 1) / 2; }

// What a 4-bit tensor of n elements takes; InvalidArgument naming `function` unless n > 0 and
// type / blocksize are a bitsandbytes 4-bit format and block size.
struct Quant4Sizes {
  int64_t packed_bytes;
  int64_t absmax_count;
};
Quant4Sizes quant4_sizes(std::string_view function, int64_t n, Format type, int64_t blocksize);
// The same, and InvalidArgument unless the caller's buffers hold exactly that much.
Quant4Sizes check_quant4_buffers(std::string_view function, int64_t n, Format type, int64_t blocksize,
                                 int64_t packed_bytes, int64_t absmax_count);

// packed: packed_size(n) bytes; absmax: num_blocks(n, blocksize) floats.
void quantize_4bit(const void* input, Format dtype, int64_t n, Format type, int64_t blocksize,
                   uint8_t* packed, float* absmax, Backend backend = Backend::automatic);

// output: n elements of `dtype`.
void dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n, Format type, int64_t blocksize,
                     void* output, Format dtype, Backend backend = Backend::automatic);

// The same on the current CUDA device: every pointer in its memory (torch CUDA tensors),
// queued on `stream` (a cudaStream_t as an integer; 0 = the legacy default stream) without
// synchronizing. Arguments are checked as above; BackendUnavailable without CUDA.
void quantize_4bit_device(const void* input, Format dtype, int64_t n, Format type, int64_t blocksize,
                          uint8_t* packed, float* absmax, uintptr_t stream);
void dequantize_4bit_device(const uint8_t* packed, const float* absmax, int64_t n, Format type, int64_t blocksize,
                            void* output, Format dtype, uintptr_t stream);

// Elements [begin, end) of the flattened tensor as float32 into output[0, end-begin):
// for consumers that dequantize tile by tile (the 4-bit LoRA GEMM).
void dequantize_4bit_range(const uint8_t* packed, const float* absmax, Format type, int64_t blocksize,
                           int64_t begin, int64_t end, float* output, Backend backend = Backend::scalar);

// 8-bit blockwise quantization with a 256-entry ascending code book, as
// bitsandbytes' CPU quantize_blockwise does it (absmax ignores NaN, a
// zero block gets code 0, values are looked up in a 65536-entry table).
void quantize_blockwise_8bit(const float* input, int64_t n, int64_t blocksize, const float* code256,
                             uint8_t* codes, float* absmax);
void dequantize_blockwise_8bit(const uint8_t* codes, const float* absmax, int64_t n, int64_t blocksize,
                               const float* code256, float* output);

// Double quantization of the per-block absmax: offset = mean(absmax) (in
// PyTorch's summation order for `mean_threads` threads, so bitsandbytes'
// offset is reproduced bit for bit), then absmax - offset in 8-bit blocks of
// `blocksize` (256) with the signed dynamic map.
struct NestedAbsmax {
  std::vector<uint8_t> codes;   // one per 4-bit block
  std::vector<float> absmax;    // one per nested block
  float offset = 0.0f;
  int64_t blocksize = 256;
};

NestedAbsmax double_quantize(const float* absmax, int64_t count, int64_t nested_blocksize = 256,
                             std::optional<float> offset = std::nullopt, int mean_threads = 1);
// code[codes[i]] * nested_absmax[i / blocksize], then + offset (two roundings, as bitsandbytes).
void double_dequantize(const NestedAbsmax& nested, float* absmax_out);

// Owning convenience type for C++ callers.
struct Quantized4 {
  Format type = Format::nf4;
  int64_t blocksize = 64;
  std::vector<int64_t> shape;
  Format dtype = Format::f32;
  std::vector<uint8_t> packed;
  std::vector<float> absmax;             // plain absmax (empty when nested)
  std::optional<NestedAbsmax> nested;    // set when double-quantized
  int64_t numel() const;
  std::vector<float> block_absmax() const;  // plain or dequantized nested absmax
};

Quantized4 quantize_4bit(const void* input, Format dtype, const std::vector<int64_t>& shape, Format type,
                         int64_t blocksize = 64, bool double_quant = false,
                         Backend backend = Backend::automatic);
// n elements of `dtype` into output.
void dequantize_4bit(const Quantized4& tensor, void* output, Format dtype, Backend backend = Backend::automatic);

}  // namespace halo
