// Throwing look-ups over the format table, the 4-bit code books, and the
// scalar reference row conversions of every format that has them.
#include "halo/core/format.hpp"

#include <cmath>
#include <cstddef>
#include <algorithm>
#include <cstring>
#include <string>

#include "halo/core/convert.hpp"
#include "halo/core/error.hpp"
#include "halo/core/parallel.hpp"
#include "halo/gguf/quants.hpp"
#include "halo/quant/codebook4.hpp"

namespace halo {
namespace {

std::string names_where(bool (*keep)(const FormatTraits&), std::string_view FormatTraits::*field) {
  std::string out;
  for (const FormatTraits& t : kFormats) {
    if (!keep(t) || (t.*field).empty()) continue;
    if (!out.empty()) out += ", ";
    out += t.*field;
  }
  return out;
}

bool any_row(const FormatTraits&) { return true; }

// ---- element rows --------------------------------------------------------------------------------

template <typename T>
void plain_to_float(const void* src, float* dst, int64_t n) {
  const T* in = static_cast<const T*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(in[i]);
}

template <typename T>
void plain_from_float(const float* src, void* dst, int64_t n) {
  T* out = static_cast<T*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(src[i]);
}

void f16_row_to_float(const void* src, float* dst, int64_t n) {
  const auto* in = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(in[i]);
}
void f16_row_from_float(const float* src, void* dst, int64_t n) {
  auto* out = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_f16(src[i]);
}
void bf16_row_to_float(const void* src, float* dst, int64_t n) {
  const auto* in = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(in[i]);
}
void bf16_row_from_float(const float* src, void* dst, int64_t n) {
  auto* out = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(src[i]);
}
void bool_row_to_float(const void* src, float* dst, int64_t n) {
  const auto* in = static_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = in[i] ? 1.0f : 0.0f;
}

// 8-bit floats, decoded exactly: sign, `exponent_bits`, the rest mantissa.
// fn ("finite") variants have no infinity; e4m3fn's only NaN is S.1111.111,
// the fnuz variants' only NaN is 0x80 (no negative zero) and their bias is one more.
template <int ExponentBits, bool Fnuz>
float decode_f8(uint8_t bits) {
  constexpr int mantissa_bits = 7 - ExponentBits;
  constexpr int bias = (1 << (ExponentBits - 1)) - 1 + (Fnuz ? 1 : 0);
  if (Fnuz && bits == 0x80) return std::nanf("");
  const bool negative = bits & 0x80;
  const int exponent = (bits >> mantissa_bits) & ((1 << ExponentBits) - 1);
  const int mantissa = bits & ((1 << mantissa_bits) - 1);
  float magnitude;
  if (!Fnuz && ExponentBits == 5 && exponent == 31) {  // e5m2 is IEEE-like: inf and NaN
    magnitude = mantissa ? std::nanf("") : INFINITY;
  } else if (!Fnuz && ExponentBits == 4 && exponent == 15 && mantissa == 7) {
    magnitude = std::nanf("");
  } else if (exponent == 0) {
    magnitude = std::ldexp(float(mantissa), 1 - bias - mantissa_bits);
  } else {
    magnitude = std::ldexp(float(mantissa + (1 << mantissa_bits)), exponent - bias - mantissa_bits);
  }
  return negative ? -magnitude : magnitude;
}

template <int ExponentBits, bool Fnuz>
void f8_row_to_float(const void* src, float* dst, int64_t n) {
  const auto* in = static_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = decode_f8<ExponentBits, Fnuz>(in[i]);
}

// Element rows are converted here; block rows come from the list their area keeps in the
// table's order (GGUF: gguf::kBlockCodecs, checked position by position in gguf/quants.hpp).
// Which directions a row has is recorded from the argument types (a function or nullptr): GCC
// cannot compare a function's address with null in a constant expression under -fsanitize.
struct CodecRow {
  RowCodec codec;
  bool to = false, from = false;
};
struct Codecs {
  std::array<CodecRow, kFormats.size()> rows{};
  constexpr void set(Format f, RowToFloat to, RowFromFloat from) { rows[size_t(f)] = {{to, from}, true, true}; }
  constexpr void set(Format f, RowToFloat to, std::nullptr_t) { rows[size_t(f)] = {{to, nullptr}, true, false}; }
};
constexpr std::array<CodecRow, kFormats.size()> make_codecs() {
  Codecs out;
  auto set = [&](Format f, RowToFloat to, auto from) { out.set(f, to, from); };
  set(Format::f64, plain_to_float<double>, plain_from_float<double>);
  set(Format::f32, plain_to_float<float>, plain_from_float<float>);
  set(Format::f16, f16_row_to_float, f16_row_from_float);
  set(Format::bf16, bf16_row_to_float, bf16_row_from_float);
  set(Format::i64, plain_to_float<int64_t>, nullptr);
  set(Format::i32, plain_to_float<int32_t>, nullptr);
  set(Format::i16, plain_to_float<int16_t>, nullptr);
  set(Format::i8, plain_to_float<int8_t>, nullptr);
  set(Format::u8, plain_to_float<uint8_t>, nullptr);
  set(Format::boolean, bool_row_to_float, nullptr);
  set(Format::f8_e4m3, f8_row_to_float<4, false>, nullptr);
  set(Format::f8_e5m2, f8_row_to_float<5, false>, nullptr);
  set(Format::f8_e4m3fnuz, f8_row_to_float<4, true>, nullptr);
  set(Format::f8_e5m2fnuz, f8_row_to_float<5, true>, nullptr);
  for (const gguf::BlockCodec& c : gguf::kBlockCodecs) set(c.format, c.to_float, c.from_float);
  return out.rows;
}
constexpr std::array<CodecRow, kFormats.size()> kCodecs = make_codecs();

// Every row is checked against the table: each format except bnb4 (codes and absmax apart)
// reads as float32; float64, the kernel floats and the GGUF blocks are also written from it.
template <size_t I>
constexpr bool codec_row_matches() {
  constexpr FormatTraits t = kFormats[I];
  static_assert(kCodecs[I].to == (t.kind != FormatKind::bnb4),
                "make_codecs(): row I of kFormats needs a to_float conversion (and bnb4 rows none)");
  constexpr bool writes = t.kind == FormatKind::ggml_block || is_kernel_float(t.format) || t.format == Format::f64;
  static_assert(kCodecs[I].from == writes,
                "make_codecs(): row I of kFormats has a from_float conversion exactly when it is written");
  return true;
}
template <size_t... I>
constexpr bool check_codec_rows(std::index_sequence<I...>) {
  return (codec_row_matches<I>() && ...);
}
static_assert(check_codec_rows(std::make_index_sequence<kFormats.size()>()));

void check_row(std::string_view function, Format format, int64_t n, bool available, const char* direction) {
  const FormatTraits& t = traits(format);
  require(available, function, "format ", t.name, " has no conversion ", direction, " float32");
  require(n >= 0, function, "element count must be >= 0, got ", n);
  require(t.block_elems > 0 && n % t.block_elems == 0, function, n, " elements are not a whole number of ",
          t.name, " blocks of ", t.block_elems);
}

}  // namespace

Format parse_format(std::string_view function, std::string_view name) {
  if (auto f = format_from_name(name)) return *f;
  fail(function, "unknown format '", name, "'; expected one of ", names_where(any_row, &FormatTraits::name));
}

Format parse_safetensors_dtype(std::string_view function, std::string_view name) {
  if (auto f = format_from_safetensors(name)) return *f;
  fail(function, "unknown safetensors dtype \"", name, "\"; expected one of ",
       names_where(any_row, &FormatTraits::safetensors));
}

Format parse_kernel_float(std::string_view function, std::string_view name) {
  if (auto f = format_from_name(name); f && is_kernel_float(*f)) return *f;
  fail<TypeMismatch>(function, "unsupported dtype '", name, "'; expected float32, float16 or bfloat16");
}

Format parse_bnb4(std::string_view function, std::string_view name) {
  if (auto f = format_from_name(name); f && is_bnb4(*f)) return *f;
  fail(function, "quant_type must be one of ",
       names_where([](const FormatTraits& t) { return t.kind == FormatKind::bnb4; }, &FormatTraits::name),
       ", got '", name, "'");
}

void check_bnb4(std::string_view function, Format format, int64_t blocksize) {
  require(is_bnb4(format), function, "format ", format_name(format), " is not a bitsandbytes 4-bit format");
  require(valid_bnb4_blocksize(blocksize), function, "blocksize must be a power of two in ", kBnb4MinBlock, "..",
          kBnb4MaxBlock, ", got ", blocksize);
}

const Codebook4& codebook4(Format format) {
  switch (format) {
    case Format::nf4: return kNF4;
    case Format::fp4: return kFP4;
    default: fail("codebook4", "format ", format_name(format), " is not a 4-bit code-book format");
  }
}

const RowCodec& row_codec(Format format) { return kCodecs[size_t(format)].codec; }

void to_float(Format format, const void* src, float* dst, int64_t n) {
  const RowCodec& codec = row_codec(format);
  check_row("to_float", format, n, codec.to_float != nullptr, "to");
  const int64_t block = traits(format).block_elems;
  const int64_t in_bytes = traits(format).block_bytes;
  parallel_for(n / block, std::max<int64_t>(1, (1 << 16) / block), [&](int64_t first, int64_t last) {
    codec.to_float(static_cast<const char*>(src) + first * in_bytes, dst + first * block, (last - first) * block);
  });
}

void from_float(Format format, const float* src, void* dst, int64_t n) {
  const RowCodec& codec = row_codec(format);
  check_row("from_float", format, n, codec.from_float != nullptr, "from");
  const int64_t block = traits(format).block_elems;
  const int64_t out_bytes = traits(format).block_bytes;
  parallel_for(n / block, std::max<int64_t>(1, (1 << 16) / block), [&](int64_t first, int64_t last) {
    codec.from_float(src + first * block, static_cast<char*>(dst) + first * out_bytes, (last - first) * block);
  });
}

}  // namespace halo
