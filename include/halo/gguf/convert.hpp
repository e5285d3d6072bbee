// GGUF tensor types by their file id, and multi-threaded conversion of rows of
// float32 to and from them.
//
// `type_layout` knows the block size and bytes per block of every type id a
// GGUF file may hold (so a reader can check sizes of types halo cannot convert,
// e.g. the IQ types); `convertible` says which ones halo quantizes and
// dequantizes: F64, F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, Q8_K
// (the rows of the format table, include/halo/core/format.hpp, that have both
// conversions; F16 and BF16 are written with ggml's NaN spelling).
// `quantize_rows` gives exactly the bytes of the scalar reference rows in
// gguf/quants.hpp (ggml's reference quantizer), using the AVX-512 / AVX2 kernels
// of Q8_0, Q4_0, Q5_0, Q4_K, Q5_K and Q6_K where the CPU has them, chosen by
// halo::dispatch (tables "gguf.quantize_<type>" in halo.kernels()).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "halo/backend/backend.hpp"
#include "halo/core/format.hpp"

namespace halo::gguf {

// The ggml type id of a format table row (a compile error for a row GGUF has no type for).
constexpr uint32_t ggml_id(Format format) {
  if (traits(format).ggml_type < 0) throw "ggml_id: this format has no GGUF type";
  return uint32_t(traits(format).ggml_type);
}

// ggml_type ids as stored in GGUF tensor infos: the format table's GGUF rows take their id
// from the table; the types halo only reads (not rows of the table) are listed here.
enum class GgmlType : uint32_t {
  f64 = ggml_id(Format::f64), f32 = ggml_id(Format::f32), f16 = ggml_id(Format::f16),
  bf16 = ggml_id(Format::bf16), i64 = ggml_id(Format::i64), i32 = ggml_id(Format::i32),
  i16 = ggml_id(Format::i16), i8 = ggml_id(Format::i8),
  q4_0 = ggml_id(Format::q4_0), q4_1 = ggml_id(Format::q4_1), q5_0 = ggml_id(Format::q5_0),
  q5_1 = ggml_id(Format::q5_1), q8_0 = ggml_id(Format::q8_0), q2_k = ggml_id(Format::q2_k),
  q3_k = ggml_id(Format::q3_k), q4_k = ggml_id(Format::q4_k), q5_k = ggml_id(Format::q5_k),
  q6_k = ggml_id(Format::q6_k), q8_k = ggml_id(Format::q8_k),
  q8_1 = 9, iq2_xxs = 16, iq2_xs = 17, iq3_xxs = 18, iq1_s = 19, iq4_nl = 20, iq3_s = 21, iq2_s = 22,
  iq4_xs = 23, iq1_m = 29, tq1_0 = 34, tq2_0 = 35, mxfp4 = 39, nvfp4 = 40, q1_0 = 41, q2_0 = 42,
};
constexpr GgmlType ggml_type_of(Format format) { return GgmlType(ggml_id(format)); }

struct TypeLayout {
  GgmlType type;
  std::string_view name;  // as gguf-py spells it: "F32", "Q4_K", ...
  int64_t block;          // elements per block (1 for plain element types)
  int64_t bytes;          // bytes per block
};

// Layout of a type id; nullopt for ids no ggml version defines.
std::optional<TypeLayout> type_layout(uint32_t id);
// Parses a name ("q4_k", "Q4_K", "f16", ...); InvalidArgument when unknown.
GgmlType parse_type(std::string_view name);
std::string_view type_name(GgmlType type);

// Whether halo converts this type to and from float32.
bool convertible(GgmlType type);

// Bytes of `n` elements; InvalidArgument unless n is a multiple of the block size.
uint64_t type_bytes(GgmlType type, int64_t n);

// Quantizes n float32 values (a multiple of the block size) into `out`
// (type_bytes(type, n) bytes). Threads over blocks; the result does not depend
// on the backend or the thread count.
void quantize_rows(GgmlType type, const float* in, void* out, int64_t n, Backend backend = Backend::automatic);

// Dequantizes n values of `type` into float32.
void dequantize_rows(GgmlType type, const void* in, float* out, int64_t n, Backend backend = Backend::automatic);

}  // namespace halo::gguf
