// GGUF type ids (the format table's GGUF rows plus the types halo only reads),
// and the dispatch of the row conversions: the format table's scalar rows or
// the per-ISA kernels (kernels.hpp) through halo::dispatch, threaded over blocks.
#include "halo/gguf/convert.hpp"

#include <array>
#include <cctype>
#include <cstring>
#include <iterator>
#include <string>
#include <utility>

#include "halo/backend/dispatch.hpp"
#include "halo/core/error.hpp"
#include "halo/core/format.hpp"
#include "halo/core/parallel.hpp"
#include "halo/gguf/quants.hpp"
#include "src/gguf/kernels.hpp"

namespace halo::gguf {
namespace {

// GGUF tensor types that are not rows of halo's format table (halo reads files holding
// them but does not convert them); sizes as ggml's type traits give them.
constexpr TypeLayout kOtherLayouts[] = {
    {GgmlType::q8_1, "Q8_1", 32, 36},        {GgmlType::iq2_xxs, "IQ2_XXS", 256, 66},
    {GgmlType::iq2_xs, "IQ2_XS", 256, 74},   {GgmlType::iq3_xxs, "IQ3_XXS", 256, 98},
    {GgmlType::iq1_s, "IQ1_S", 256, 50},     {GgmlType::iq4_nl, "IQ4_NL", 32, 18},
    {GgmlType::iq3_s, "IQ3_S", 256, 110},    {GgmlType::iq2_s, "IQ2_S", 256, 82},
    {GgmlType::iq4_xs, "IQ4_XS", 256, 136},  {GgmlType::iq1_m, "IQ1_M", 256, 56},
    {GgmlType::tq1_0, "TQ1_0", 256, 54},     {GgmlType::tq2_0, "TQ2_0", 256, 66},
    {GgmlType::mxfp4, "MXFP4", 32, 17},      {GgmlType::nvfp4, "NVFP4", 64, 36},
    {GgmlType::q1_0, "Q1_0", 128, 18},       {GgmlType::q2_0, "Q2_0", 64, 18},
};

// A type halo only reads must not also be a row of the format table.
constexpr bool other_layouts_are_not_rows() {
  for (const TypeLayout& layout : kOtherLayouts)
    if (format_from_ggml_type(int(layout.type))) return false;
  return true;
}
static_assert(other_layouts_are_not_rows(), "kOtherLayouts lists a type that is a row of kFormats");

std::optional<Format> table_format(GgmlType type) { return format_from_ggml_type(int(type)); }

// Quantizing rows: every row of the format table with a GGUF type and a writer gets a
// kernel table ("gguf.quantize_<name>") whose scalar entry is the reference row (element
// rows as ggml writes them: F16 and BF16 with ggml's rounding, which spells NaN differently
// from the format table's torch-exact rows; block rows the table's codecs), and SIMD entries
// where they pay (the K-quant scale searches dominate an export).
void copy_f32(const float* in, void* out, int64_t n) { std::memcpy(out, in, size_t(n) * 4); }
void copy_f64(const float* in, void* out, int64_t n) {
  auto* dst = static_cast<double*>(out);
  for (int64_t i = 0; i < n; ++i) dst[i] = double(in[i]);
}

constexpr RowFromFloat gguf_writer(Format format) {
  switch (format) {
    case Format::f64: return copy_f64;
    case Format::f32: return copy_f32;
    case Format::f16: return from_float_f16;
    case Format::bf16: return from_float_bf16;
    default: break;
  }
  for (const BlockCodec& c : kBlockCodecs)
    if (c.format == format) return c.from_float;
  return nullptr;
}

struct SimdQuantizers {
  Format format;
  kernels::QuantizeKernel avx2, avx512;
};
constexpr SimdQuantizers kSimdQuantizers[] = {
    {Format::q4_0, kernels::quantize_q4_0_avx2, kernels::quantize_q4_0_avx512},
    {Format::q5_0, kernels::quantize_q5_0_avx2, kernels::quantize_q5_0_avx512},
    {Format::q8_0, kernels::quantize_q8_0_avx2, kernels::quantize_q8_0_avx512},
    {Format::q4_k, kernels::quantize_q4_k_avx2, kernels::quantize_q4_k_avx512},
    {Format::q5_k, kernels::quantize_q5_k_avx2, kernels::quantize_q5_k_avx512},
    {Format::q6_k, kernels::quantize_q6_k_avx2, kernels::quantize_q6_k_avx512},
};
constexpr SimdQuantizers simd_quantizers(Format format) {
  for (const SimdQuantizers& s : kSimdQuantizers)
    if (s.format == format) return s;
  return {format, nullptr, nullptr};
}

// Whether gguf_writer has a writer for the row (said without comparing function addresses,
// which GCC cannot do in a constant expression under -fsanitize).
constexpr bool has_gguf_writer(Format format) {
  if (format == Format::f64 || format == Format::f32 || format == Format::f16 || format == Format::bf16) return true;
  for (const BlockCodec& c : kBlockCodecs)
    if (c.format == format) return true;
  return false;
}
constexpr bool quantizable(const FormatTraits& t) { return t.ggml_type >= 0 && has_gguf_writer(t.format); }
constexpr size_t kQuantizableCount = [] {
  size_t n = 0;
  for (const FormatTraits& t : kFormats) n += quantizable(t);
  return n;
}();
// The quantizable rows in the table's order: the index of a kernel table below.
constexpr std::array<Format, kQuantizableCount> kQuantizable = [] {
  std::array<Format, kQuantizableCount> out{};
  size_t i = 0;
  for (const FormatTraits& t : kFormats)
    if (quantizable(t)) out[i++] = t.format;
  return out;
}();

template <size_t I>
void quantize_scalar(const float* in, void* out, int64_t blocks) {
  constexpr Format format = kQuantizable[I];
  constexpr RowFromFloat row = gguf_writer(format);
  row(in, out, blocks * traits(format).block_elems);
}

using Table = KernelTable<kernels::QuantizeKernel>;

const std::array<std::string, kQuantizableCount> kOpNames = [] {
  std::array<std::string, kQuantizableCount> out;
  for (size_t i = 0; i < kQuantizableCount; ++i) {  // the GGUF type name in lower case: "gguf.quantize_q4_k"
    out[i] = "gguf.quantize_" + std::string(traits(kQuantizable[i]).gguf);
    for (char& c : out[i]) c = char(std::tolower(static_cast<unsigned char>(c)));
  }
  return out;
}();

template <size_t... I>
std::array<Table, kQuantizableCount> make_tables(std::index_sequence<I...>) {
  return {Table{kOpNames[I],
                {rung(Backend::scalar, quantize_scalar<I>),
                 rung(Backend::avx2, simd_quantizers(kQuantizable[I]).avx2),
                 rung(Backend::avx512, simd_quantizers(kQuantizable[I]).avx512)}}...};
}
const std::array<Table, kQuantizableCount> kTables = make_tables(std::make_index_sequence<kQuantizableCount>());

struct Registrations {
  Registrations() {
    for (const Table& t : kTables) KernelRegistration{t};
  }
} const kRegistrations;

const Table* quantize_table(GgmlType type) {
  const auto format = table_format(type);
  for (size_t i = 0; format && i < kQuantizableCount; ++i)
    if (kQuantizable[i] == *format) return &kTables[i];
  return nullptr;
}

RowToFloat gguf_to_float(GgmlType type) {
  const auto f = table_format(type);
  return f ? row_codec(*f).to_float : nullptr;
}

TypeLayout checked_layout(std::string_view fn, GgmlType type, int64_t n) {
  const auto layout = type_layout(uint32_t(type));
  if (!layout) fail(fn, "unknown GGUF tensor type id ", uint32_t(type));
  require(n >= 0 && n % layout->block == 0, fn, "element count ", n, " is not a multiple of ", layout->name,
          "'s block size ", layout->block);
  return *layout;
}

// Blocks per thread chunk: enough work to amortize a task.
int64_t grain_blocks(const TypeLayout& layout) { return layout.block >= 256 ? 64 : (layout.block == 1 ? 16384 : 512); }

}  // namespace

std::optional<TypeLayout> type_layout(uint32_t id) {
  if (id <= uint32_t(INT32_MAX)) {
    if (const auto f = format_from_ggml_type(int(id))) {
      const FormatTraits& t = traits(*f);
      return TypeLayout{GgmlType(id), t.gguf, t.block_elems, t.block_bytes};
    }
  }
  for (const TypeLayout& layout : kOtherLayouts)
    if (uint32_t(layout.type) == id) return layout;
  return std::nullopt;
}

GgmlType parse_type(std::string_view name) {
  std::string upper(name);
  for (char& c : upper) c = char(std::toupper(static_cast<unsigned char>(c)));
  for (const FormatTraits& t : kFormats)
    if (t.ggml_type >= 0 && t.gguf == upper) return GgmlType(t.ggml_type);
  for (const TypeLayout& layout : kOtherLayouts)
    if (layout.name == upper) return layout.type;
  fail("parse_type", "unknown GGUF tensor type '", name, "'");
}

std::string_view type_name(GgmlType type) {
  const auto layout = type_layout(uint32_t(type));
  return layout ? layout->name : std::string_view("?");
}

bool convertible(GgmlType type) { return gguf_to_float(type) != nullptr && quantize_table(type) != nullptr; }

uint64_t type_bytes(GgmlType type, int64_t n) {
  const TypeLayout layout = checked_layout("type_bytes", type, n);
  return uint64_t(n / layout.block) * uint64_t(layout.bytes);
}

void quantize_rows(GgmlType type, const float* in, void* out, int64_t n, Backend backend) {
  const char* fn = "quantize_rows";
  const TypeLayout layout = checked_layout(fn, type, n);
  const Table* table = quantize_table(type);
  if (table == nullptr) fail(fn, "type ", layout.name, " cannot be quantized by halo");
  const kernels::QuantizeKernel kernel = dispatch(*table, backend).kernel;
  const int64_t block = layout.block, bytes = layout.bytes;
  auto* dst = static_cast<uint8_t*>(out);
  parallel_for(n / block, grain_blocks(layout),
               [&](int64_t b0, int64_t b1) { kernel(in + b0 * block, dst + b0 * bytes, b1 - b0); });
}

void dequantize_rows(GgmlType type, const void* in, float* out, int64_t n, Backend backend) {
  const char* fn = "dequantize_rows";
  const TypeLayout layout = checked_layout(fn, type, n);
  const RowToFloat row = gguf_to_float(type);
  if (row == nullptr) fail(fn, "type ", layout.name, " cannot be dequantized by halo");
  require(resolve(backend) != Backend::cuda, fn, "works on host memory; backend 'cuda' is not accepted");
  const int64_t block = layout.block, bytes = layout.bytes;
  const auto* src = static_cast<const uint8_t*>(in);
  parallel_for(n / block, grain_blocks(layout), [&](int64_t b0, int64_t b1) {
    row(src + b0 * bytes, out + b0 * block, (b1 - b0) * block);
  });
}

}  // namespace halo::gguf
