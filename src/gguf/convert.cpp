// GGUF type ids (the format table's GGUF rows plus the types halo only reads),
// and the dispatch of the row conversions: the format table's scalar rows or
// the per-ISA kernels (kernels.hpp) through halo::dispatch, threaded over blocks.
#include "halo/gguf/convert.hpp"

#include <array>
#include <cctype>
#include <cstring>
#include <iterator>
#include <string>

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

std::optional<Format> table_format(GgmlType type) { return format_from_ggml_type(int(type)); }

// Quantizing rows: every convertible type has a kernel table whose scalar entry is the
// reference row (F16 and BF16 with ggml's rounding, which spells NaN differently from the
// format table's torch-exact rows; block types the format table's GGUF rows), and SIMD
// entries where they pay (the K-quant scale searches dominate an export).
template <RowFromFloat Row, int64_t Block>
void scalar_blocks(const float* in, void* out, int64_t blocks) {
  Row(in, out, blocks * Block);
}

void copy_f32(const float* in, void* out, int64_t n) { std::memcpy(out, in, size_t(n) * 4); }
void copy_f64(const float* in, void* out, int64_t n) {
  auto* dst = static_cast<double*>(out);
  for (int64_t i = 0; i < n; ++i) dst[i] = double(in[i]);
}

using Table = KernelTable<kernels::QuantizeKernel>;
const Table kTables[] = {
    {"gguf.quantize_f64", scalar_blocks<copy_f64, 1>},
    {"gguf.quantize_f32", scalar_blocks<copy_f32, 1>},
    {"gguf.quantize_f16", scalar_blocks<from_float_f16, 1>},
    {"gguf.quantize_bf16", scalar_blocks<from_float_bf16, 1>},
    {"gguf.quantize_q4_0", scalar_blocks<from_float_q4_0, 32>, kernels::quantize_q4_0_avx2,
     kernels::quantize_q4_0_avx512},
    {"gguf.quantize_q4_1", scalar_blocks<from_float_q4_1, 32>},
    {"gguf.quantize_q5_0", scalar_blocks<from_float_q5_0, 32>, kernels::quantize_q5_0_avx2,
     kernels::quantize_q5_0_avx512},
    {"gguf.quantize_q5_1", scalar_blocks<from_float_q5_1, 32>},
    {"gguf.quantize_q8_0", scalar_blocks<from_float_q8_0, 32>, kernels::quantize_q8_0_avx2,
     kernels::quantize_q8_0_avx512},
    {"gguf.quantize_q2_k", scalar_blocks<from_float_q2_k, 256>},
    {"gguf.quantize_q3_k", scalar_blocks<from_float_q3_k, 256>},
    {"gguf.quantize_q4_k", scalar_blocks<from_float_q4_k, 256>, kernels::quantize_q4_k_avx2,
     kernels::quantize_q4_k_avx512},
    {"gguf.quantize_q5_k", scalar_blocks<from_float_q5_k, 256>, kernels::quantize_q5_k_avx2,
     kernels::quantize_q5_k_avx512},
    {"gguf.quantize_q6_k", scalar_blocks<from_float_q6_k, 256>, kernels::quantize_q6_k_avx2,
     kernels::quantize_q6_k_avx512},
    {"gguf.quantize_q8_k", scalar_blocks<from_float_q8_k, 256>},
};
constexpr GgmlType kTableTypes[] = {GgmlType::f64,  GgmlType::f32,  GgmlType::f16,  GgmlType::bf16, GgmlType::q4_0,
                                    GgmlType::q4_1, GgmlType::q5_0, GgmlType::q5_1, GgmlType::q8_0, GgmlType::q2_k,
                                    GgmlType::q3_k, GgmlType::q4_k, GgmlType::q5_k, GgmlType::q6_k, GgmlType::q8_k};
static_assert(std::size(kTables) == std::size(kTableTypes));

struct Registrations {
  Registrations() {
    for (const Table& t : kTables) KernelRegistration{t};
  }
} const kRegistrations;

const Table* quantize_table(GgmlType type) {
  for (size_t i = 0; i < std::size(kTableTypes); ++i)
    if (kTableTypes[i] == type) return &kTables[i];
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
