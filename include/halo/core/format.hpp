// One table for every element and block format halo reads or writes.
//
// A format is data: a row of kFormats gives its names as halo, torch, NumPy,
// safetensors and GGUF spell them, its block shape (elements per block, bytes
// per block; element types are blocks of one), its code book where it has one,
// and the PEP 3118 buffer format characters that hold it. Kernels and readers
// are written once against these traits (ggml's type_traits and gguf-py's
// GGML_QUANT_SIZES are the model). Adding a format is a row here plus its
// kernels: see docs/architecture.md.
//
// Scalar reference row conversions (to and from float32) live beside the
// table in src/core/format.cpp (`to_float` / `from_float` below), so the
// table itself stays a compile-time constant free of link dependencies.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>
#include <utility>

#include "halo/core/codebooks.hpp"

namespace halo {

enum class Format : uint8_t {
  // elements
  f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean, f8_e4m3, f8_e5m2, f8_e4m3fnuz, f8_e5m2fnuz,
  // bitsandbytes 4-bit blocks: codes and absmax in separate arrays, block size chosen per tensor
  nf4, fp4,
  // GGUF (ggml) blocks: scale(s) and codes interleaved in fixed-size blocks
  q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, q8_k,
};

enum class FormatKind : uint8_t { floating, integer, boolean, bnb4, ggml_block };

struct FormatTraits {
  Format format;
  FormatKind kind;
  std::string_view name;         // halo's name: the torch/NumPy dtype name, or the quant type ("nf4", "q4_k")
  std::string_view torch;        // torch dtype attribute ("" when torch has none)
  std::string_view numpy;        // NumPy (or ml_dtypes) dtype name ("" when none)
  std::string_view safetensors;  // safetensors dtype ("" when it cannot be stored as such)
  std::string_view gguf;         // GGMLQuantizationType name ("" when none)
  int ggml_type;                 // ggml_type id, -1 when none
  int64_t block_elems;           // elements per block; 1 for element types; 0 = chosen per tensor (bnb4)
  int64_t block_bytes;           // bytes per block (item size for element types); 0 when variable
  double bits_per_element;       // stored bits per element (excluding a bnb4 tensor's absmax)
  std::string_view buffer;       // PEP 3118 format characters a buffer of it may have ("" = not bufferable)
  const float* code_book;        // code value of each index (nullptr when none)
  int code_size;
};

inline constexpr std::array<FormatTraits, 27> kFormats = {{
    // format              kind                   name            torch              numpy              safetensors    gguf     ggml blk bytes bits  buffer  codes
    {Format::f64, FormatKind::floating, "float64", "float64", "float64", "F64", "F64", 28, 1, 8, 64, "d", nullptr, 0},
    {Format::f32, FormatKind::floating, "float32", "float32", "float32", "F32", "F32", 0, 1, 4, 32, "f", nullptr, 0},
    {Format::f16, FormatKind::floating, "float16", "float16", "float16", "F16", "F16", 1, 1, 2, 16, "e", nullptr, 0},
    // bfloat16 crosses the buffer protocol as its 16-bit pattern (NumPy has no bfloat16 buffer character).
    {Format::bf16, FormatKind::floating, "bfloat16", "bfloat16", "bfloat16", "BF16", "BF16", 30, 1, 2, 16, "Hh",
     nullptr, 0},
    {Format::i64, FormatKind::integer, "int64", "int64", "int64", "I64", "I64", 27, 1, 8, 64, "lq", nullptr, 0},
    {Format::i32, FormatKind::integer, "int32", "int32", "int32", "I32", "I32", 26, 1, 4, 32, "i", nullptr, 0},
    {Format::i16, FormatKind::integer, "int16", "int16", "int16", "I16", "I16", 25, 1, 2, 16, "h", nullptr, 0},
    {Format::i8, FormatKind::integer, "int8", "int8", "int8", "I8", "I8", 24, 1, 1, 8, "b", nullptr, 0},
    {Format::u8, FormatKind::integer, "uint8", "uint8", "uint8", "U8", "", -1, 1, 1, 8, "B", nullptr, 0},
    {Format::boolean, FormatKind::boolean, "bool", "bool", "bool", "BOOL", "", -1, 1, 1, 8, "?", nullptr, 0},
    {Format::f8_e4m3, FormatKind::floating, "float8_e4m3fn", "float8_e4m3fn", "float8_e4m3fn", "F8_E4M3", "", -1, 1,
     1, 8, "B", nullptr, 0},
    {Format::f8_e5m2, FormatKind::floating, "float8_e5m2", "float8_e5m2", "float8_e5m2", "F8_E5M2", "", -1, 1, 1, 8,
     "B", nullptr, 0},
    {Format::f8_e4m3fnuz, FormatKind::floating, "float8_e4m3fnuz", "float8_e4m3fnuz", "float8_e4m3fnuz",
     "F8_E4M3FNUZ", "", -1, 1, 1, 8, "B", nullptr, 0},
    {Format::f8_e5m2fnuz, FormatKind::floating, "float8_e5m2fnuz", "float8_e5m2fnuz", "float8_e5m2fnuz",
     "F8_E5M2FNUZ", "", -1, 1, 1, 8, "B", nullptr, 0},
    {Format::nf4, FormatKind::bnb4, "nf4", "", "", "", "", -1, 0, 0, 4, "", kNF4Code.data(), 16},
    {Format::fp4, FormatKind::bnb4, "fp4", "", "", "", "", -1, 0, 0, 4, "", kFP4Code.data(), 16},
    {Format::q4_0, FormatKind::ggml_block, "q4_0", "", "", "", "Q4_0", 2, 32, 18, 4.5, "", nullptr, 0},
    {Format::q4_1, FormatKind::ggml_block, "q4_1", "", "", "", "Q4_1", 3, 32, 20, 5.0, "", nullptr, 0},
    {Format::q5_0, FormatKind::ggml_block, "q5_0", "", "", "", "Q5_0", 6, 32, 22, 5.5, "", nullptr, 0},
    {Format::q5_1, FormatKind::ggml_block, "q5_1", "", "", "", "Q5_1", 7, 32, 24, 6.0, "", nullptr, 0},
    {Format::q8_0, FormatKind::ggml_block, "q8_0", "", "", "", "Q8_0", 8, 32, 34, 8.5, "", nullptr, 0},
    {Format::q2_k, FormatKind::ggml_block, "q2_k", "", "", "", "Q2_K", 10, 256, 84, 2.625, "", nullptr, 0},
    {Format::q3_k, FormatKind::ggml_block, "q3_k", "", "", "", "Q3_K", 11, 256, 110, 3.4375, "", nullptr, 0},
    {Format::q4_k, FormatKind::ggml_block, "q4_k", "", "", "", "Q4_K", 12, 256, 144, 4.5, "", nullptr, 0},
    {Format::q5_k, FormatKind::ggml_block, "q5_k", "", "", "", "Q5_K", 13, 256, 176, 5.5, "", nullptr, 0},
    {Format::q6_k, FormatKind::ggml_block, "q6_k", "", "", "", "Q6_K", 14, 256, 210, 6.5625, "", nullptr, 0},
    {Format::q8_k, FormatKind::ggml_block, "q8_k", "", "", "", "Q8_K", 15, 256, 292, 9.125, "", nullptr, 0},
}};

constexpr const FormatTraits& traits(Format format) { return kFormats[static_cast<size_t>(format)]; }

// Row i of kFormats is Format i: checked row by row (the error names the first bad row).
namespace detail {
template <size_t I>
constexpr bool format_row_matches() {
  static_assert(kFormats[I].format == static_cast<Format>(I), "kFormats[I] must be the row of Format value I");
  return true;
}
template <size_t... I>
constexpr bool check_format_rows(std::index_sequence<I...>) {
  return (format_row_matches<I>() && ...);
}
}  // namespace detail
static_assert(detail::check_format_rows(std::make_index_sequence<kFormats.size()>()));

// Rows of one kind, in table order: for the per-area lists that follow the table (the GGUF
// block codecs) to check themselves against it position by position.
constexpr size_t count_formats_of_kind(FormatKind kind) {
  size_t n = 0;
  for (const FormatTraits& t : kFormats) n += t.kind == kind;
  return n;
}
constexpr Format nth_format_of_kind(FormatKind kind, size_t index) {
  for (const FormatTraits& t : kFormats)
    if (t.kind == kind && index-- == 0) return t.format;
  throw "nth_format_of_kind: fewer rows of this kind";  // not a constant expression: a compile error
}
constexpr std::string_view format_name(Format format) { return traits(format).name; }

constexpr bool is_float(Format format) { return traits(format).kind == FormatKind::floating; }
constexpr bool is_bnb4(Format format) { return traits(format).kind == FormatKind::bnb4; }
constexpr bool is_ggml_block(Format format) { return traits(format).kind == FormatKind::ggml_block; }
// float32, float16 or bfloat16: what halo's float kernels read and write.
constexpr bool is_kernel_float(Format format) {
  return format == Format::f32 || format == Format::f16 || format == Format::bf16;
}

// Item size of an element format (bytes per element); 0 for block formats.
constexpr int64_t element_size(Format format) {
  return traits(format).block_elems == 1 ? traits(format).block_bytes : 0;
}

// Bytes `n` elements take (n a multiple of the block for GGUF blocks); -1 for bnb4,
// whose codes and absmax are stored apart (see quant/quant4.hpp).
constexpr int64_t storage_bytes(Format format, int64_t n) {
  const FormatTraits& t = traits(format);
  if (t.block_elems == 0) return -1;
  return n / t.block_elems * t.block_bytes;
}

// The bitsandbytes 4-bit block sizes: powers of two 32..4096. The one place that rule lives.
inline constexpr int64_t kBnb4MinBlock = 32;
inline constexpr int64_t kBnb4MaxBlock = 4096;
constexpr bool valid_bnb4_blocksize(int64_t blocksize) {
  return blocksize >= kBnb4MinBlock && blocksize <= kBnb4MaxBlock && (blocksize & (blocksize - 1)) == 0;
}

// Look-ups by each spelling; std::nullopt when no row matches.
constexpr std::optional<Format> format_from_name(std::string_view name) {
  for (const FormatTraits& t : kFormats)
    if (t.name == name) return t.format;
  return std::nullopt;
}
constexpr std::optional<Format> format_from_safetensors(std::string_view name) {
  for (const FormatTraits& t : kFormats)
    if (!t.safetensors.empty() && t.safetensors == name) return t.format;
  return std::nullopt;
}
constexpr std::optional<Format> format_from_ggml_type(int type) {
  for (const FormatTraits& t : kFormats)
    if (t.ggml_type >= 0 && t.ggml_type == type) return t.format;
  return std::nullopt;
}

// Throwing look-ups: InvalidArgument naming `function` and the value, listing what is accepted.
Format parse_format(std::string_view function, std::string_view name);
Format parse_safetensors_dtype(std::string_view function, std::string_view name);
// float32 / float16 / bfloat16 only (TypeMismatch otherwise).
Format parse_kernel_float(std::string_view function, std::string_view name);
// nf4 / fp4 only.
Format parse_bnb4(std::string_view function, std::string_view name);
// Throws InvalidArgument unless `format` is a bnb 4-bit format and blocksize is valid for it.
void check_bnb4(std::string_view function, Format format, int64_t blocksize);

// Scalar reference row conversions of a format to and from float32 (n elements, a
// multiple of the block). Element formats convert exactly or round to nearest even;
// block formats are registered by their areas in src/core/format.cpp.
using RowToFloat = void (*)(const void* src, float* dst, int64_t n);
using RowFromFloat = void (*)(const float* src, void* dst, int64_t n);
struct RowCodec {
  RowToFloat to_float = nullptr;
  RowFromFloat from_float = nullptr;
};
const RowCodec& row_codec(Format format);
// Checked entry points: InvalidArgument when the format has no such conversion or n is
// not a whole number of blocks.
void to_float(Format format, const void* src, float* dst, int64_t n);
void from_float(Format format, const float* src, void* dst, int64_t n);

}  // namespace halo
