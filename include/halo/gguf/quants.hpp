// llama.cpp's (ggml's) tensor types as plain row conversions: the scalar
// reference quantizers and dequantizers of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K,
// Q3_K, Q4_K, Q5_K, Q6_K and Q8_K, and ggml's F16/BF16 rounding.
//
// The quantizers give the same bytes as ggml's reference quantizer (the one
// `llama-quantize` runs when no importance matrix is given): the same float32
// operations in the same order, no fused multiply-add. `n` is a multiple of the
// type's block size (32 or 256); `blocks` holds n / block * bytes_per_block bytes.
// These are the format table's rows for the GGUF block types; `quantize_rows` /
// `dequantize_rows` (gguf/convert.hpp) are the multi-threaded SIMD entry points.
#pragma once

#include <cstdint>
#include <iterator>
#include <utility>

#include "halo/core/format.hpp"

namespace halo::gguf {

// Block layouts (bytes): Q4_0 18/32, Q4_1 20/32, Q5_0 22/32, Q5_1 24/32, Q8_0 34/32,
// Q2_K 84/256, Q3_K 110/256, Q4_K 144/256, Q5_K 176/256, Q6_K 210/256, Q8_K 292/256.
void to_float_q4_0(const void* blocks, float* out, int64_t n);
void to_float_q4_1(const void* blocks, float* out, int64_t n);
void to_float_q5_0(const void* blocks, float* out, int64_t n);
void to_float_q5_1(const void* blocks, float* out, int64_t n);
void to_float_q8_0(const void* blocks, float* out, int64_t n);
void to_float_q2_k(const void* blocks, float* out, int64_t n);
void to_float_q3_k(const void* blocks, float* out, int64_t n);
void to_float_q4_k(const void* blocks, float* out, int64_t n);
void to_float_q5_k(const void* blocks, float* out, int64_t n);
void to_float_q6_k(const void* blocks, float* out, int64_t n);
void to_float_q8_k(const void* blocks, float* out, int64_t n);

void from_float_q4_0(const float* in, void* blocks, int64_t n);
void from_float_q4_1(const float* in, void* blocks, int64_t n);
void from_float_q5_0(const float* in, void* blocks, int64_t n);
void from_float_q5_1(const float* in, void* blocks, int64_t n);
void from_float_q8_0(const float* in, void* blocks, int64_t n);
void from_float_q2_k(const float* in, void* blocks, int64_t n);
void from_float_q3_k(const float* in, void* blocks, int64_t n);
void from_float_q4_k(const float* in, void* blocks, int64_t n);
void from_float_q5_k(const float* in, void* blocks, int64_t n);
void from_float_q6_k(const float* in, void* blocks, int64_t n);
void from_float_q8_k(const float* in, void* blocks, int64_t n);

// ggml's float16 / bfloat16 rounding: nearest even; a NaN becomes the quiet NaN
// ggml writes (sign | 0x7e00 for float16, the high half | 0x0040 for bfloat16).
uint16_t fp32_to_fp16(float value);
float fp16_to_fp32(uint16_t half);
uint16_t fp32_to_bf16(float value);
float bf16_to_fp32(uint16_t bits);

void to_float_f16(const void* blocks, float* out, int64_t n);
void from_float_f16(const float* in, void* blocks, int64_t n);
void to_float_bf16(const void* blocks, float* out, int64_t n);
void from_float_bf16(const float* in, void* blocks, int64_t n);

// The format table's GGUF block rows with their scalar codecs, in the table's order: the
// one list make_codecs() (src/core/format.cpp) and the quantize tables
// (src/gguf/convert.cpp) read. A static_assert per position (check_block_codec_rows below)
// stops the build when entry i is not the i-th ggml_block row of kFormats.
struct BlockCodec {
  Format format;
  RowToFloat to_float;
  RowFromFloat from_float;
};
inline constexpr BlockCodec kBlockCodecs[] = {
    {Format::q4_0, to_float_q4_0, from_float_q4_0}, {Format::q4_1, to_float_q4_1, from_float_q4_1},
    {Format::q5_0, to_float_q5_0, from_float_q5_0}, {Format::q5_1, to_float_q5_1, from_float_q5_1},
    {Format::q8_0, to_float_q8_0, from_float_q8_0}, {Format::q2_k, to_float_q2_k, from_float_q2_k},
    {Format::q3_k, to_float_q3_k, from_float_q3_k}, {Format::q4_k, to_float_q4_k, from_float_q4_k},
    {Format::q5_k, to_float_q5_k, from_float_q5_k}, {Format::q6_k, to_float_q6_k, from_float_q6_k},
    {Format::q8_k, to_float_q8_k, from_float_q8_k},
};

namespace detail {
template <size_t I>
constexpr bool block_codec_row_matches() {
  static_assert(kBlockCodecs[I].format == nth_format_of_kind(FormatKind::ggml_block, I),
                "kBlockCodecs[I] must be the I-th ggml_block row of kFormats (include/halo/core/format.hpp)");
  return true;
}
template <size_t... I>
constexpr bool check_block_codec_rows(std::index_sequence<I...>) {
  return (block_codec_row_matches<I>() && ...);
}
}  // namespace detail
static_assert(std::size(kBlockCodecs) == count_formats_of_kind(FormatKind::ggml_block),
              "kBlockCodecs needs one entry per ggml_block row of kFormats");
static_assert(detail::check_block_codec_rows(std::make_index_sequence<std::size(kBlockCodecs)>()));

}  // namespace halo::gguf
