// GGUF type ids, and the one dispatch point of the row conversions: scalar
// reference rows (quants.hpp) or the per-ISA kernels (kernels.hpp), threaded
// over blocks with halo::parallel_for.
#include "halo/gguf/convert.hpp"

#include <array>
#include <cctype>
#include <string>

#include "halo/core/error.hpp"
#include "halo/core/parallel.hpp"
#include "halo/gguf/quants.hpp"
#include "src/gguf/kernels.hpp"

namespace halo::gguf {
namespace {

using ToFloat = void (*)(const void*, float*, int64_t);
using FromFloat = void (*)(const float*, void*, int64_t);

void to_float_f32(const void* in, float* out, int64_t n) {
  const auto* src = static_cast<const float*>(in);
  for (int64_t i = 0; i < n; ++i) out[i] = src[i];
}
void from_float_f32(const float* in, void* out, int64_t n) {
  auto* dst = static_cast<float*>(out);
  for (int64_t i = 0; i < n; ++i) dst[i] = in[i];
}

struct Row {
  TypeLayout layout;
  ToFloat to_float;
  FromFloat from_float;
};

// Sizes as ggml's type traits give them (facts of the file format).
constexpr std::array<Row, 35> kRows = {{
    {{GgmlType::f32, "F32", 1, 4}, to_float_f32, from_float_f32},
    {{GgmlType::f16, "F16", 1, 2}, to_float_f16, from_float_f16},
    {{GgmlType::q4_0, "Q4_0", 32, 18}, to_float_q4_0, from_float_q4_0},
    {{GgmlType::q4_1, "Q4_1", 32, 20}, to_float_q4_1, from_float_q4_1},
    {{GgmlType::q5_0, "Q5_0", 32, 22}, to_float_q5_0, from_float_q5_0},
    {{GgmlType::q5_1, "Q5_1", 32, 24}, to_float_q5_1, from_float_q5_1},
    {{GgmlType::q8_0, "Q8_0", 32, 34}, to_float_q8_0, from_float_q8_0},
    {{GgmlType::q8_1, "Q8_1", 32, 36}, nullptr, nullptr},
    {{GgmlType::q2_k, "Q2_K", 256, 84}, to_float_q2_k, from_float_q2_k},
    {{GgmlType::q3_k, "Q3_K", 256, 110}, to_float_q3_k, from_float_q3_k},
    {{GgmlType::q4_k, "Q4_K", 256, 144}, to_float_q4_k, from_float_q4_k},
    {{GgmlType::q5_k, "Q5_K", 256, 176}, to_float_q5_k, from_float_q5_k},
    {{GgmlType::q6_k, "Q6_K", 256, 210}, to_float_q6_k, from_float_q6_k},
    {{GgmlType::q8_k, "Q8_K", 256, 292}, to_float_q8_k, from_float_q8_k},
    {{GgmlType::iq2_xxs, "IQ2_XXS", 256, 66}, nullptr, nullptr},
    {{GgmlType::iq2_xs, "IQ2_XS", 256, 74}, nullptr, nullptr},
    {{GgmlType::iq3_xxs, "IQ3_XXS", 256, 98}, nullptr, nullptr},
    {{GgmlType::iq1_s, "IQ1_S", 256, 50}, nullptr, nullptr},
    {{GgmlType::iq4_nl, "IQ4_NL", 32, 18}, nullptr, nullptr},
    {{GgmlType::iq3_s, "IQ3_S", 256, 110}, nullptr, nullptr},
    {{GgmlType::iq2_s, "IQ2_S", 256, 82}, nullptr, nullptr},
    {{GgmlType::iq4_xs, "IQ4_XS", 256, 136}, nullptr, nullptr},
    {{GgmlType::i8, "I8", 1, 1}, nullptr, nullptr},
    {{GgmlType::i16, "I16", 1, 2}, nullptr, nullptr},
    {{GgmlType::i32, "I32", 1, 4}, nullptr, nullptr},
    {{GgmlType::i64, "I64", 1, 8}, nullptr, nullptr},
    {{GgmlType::f64, "F64", 1, 8}, nullptr, nullptr},
    {{GgmlType::iq1_m, "IQ1_M", 256, 56}, nullptr, nullptr},
    {{GgmlType::bf16, "BF16", 1, 2}, to_float_bf16, from_float_bf16},
    {{GgmlType::tq1_0, "TQ1_0", 256, 54}, nullptr, nullptr},
    {{GgmlType::tq2_0, "TQ2_0", 256, 66}, nullptr, nullptr},
    {{GgmlType::mxfp4, "MXFP4", 32, 17}, nullptr, nullptr},
    {{GgmlType::nvfp4, "NVFP4", 64, 36}, nullptr, nullptr},
    {{GgmlType::q1_0, "Q1_0", 128, 18}, nullptr, nullptr},
    {{GgmlType::q2_0, "Q2_0", 64, 18}, nullptr, nullptr},
}};

const Row* find_row(uint32_t id) {
  for (const Row& row : kRows)
    if (uint32_t(row.layout.type) == id) return &row;
  return nullptr;
}

const Row& row_of(std::string_view fn, GgmlType type) {
  const Row* row = find_row(uint32_t(type));
  if (row == nullptr) fail(fn, "unknown GGUF tensor type id ", uint32_t(type));
  return *row;
}

const Row& convertible_row(std::string_view fn, GgmlType type, int64_t n) {
  const Row& row = row_of(fn, type);
  if (row.to_float == nullptr) fail(fn, "type ", row.layout.name, " cannot be converted by halo");
  require(n >= 0 && n % row.layout.block == 0, fn, "element count ", n, " is not a multiple of ", row.layout.name,
          "'s block size ", row.layout.block);
  return row;
}

// Blocks per thread chunk: enough work to amortize a task (~64 KiB of floats).
int64_t grain_blocks(const TypeLayout& layout) { return layout.block >= 256 ? 64 : (layout.block == 1 ? 16384 : 512); }

}  // namespace

std::optional<TypeLayout> type_layout(uint32_t id) {
  const Row* row = find_row(id);
  if (row == nullptr) return std::nullopt;
  return row->layout;
}

GgmlType parse_type(std::string_view name) {
  std::string upper(name);
  for (char& c : upper) c = char(std::toupper(static_cast<unsigned char>(c)));
  for (const Row& row : kRows)
    if (row.layout.name == upper) return row.layout.type;
  fail("parse_type", "unknown GGUF tensor type '", name, "'");
}

std::string_view type_name(GgmlType type) {
  const Row* row = find_row(uint32_t(type));
  return row ? row->layout.name : std::string_view("?");
}

bool convertible(GgmlType type) {
  const Row* row = find_row(uint32_t(type));
  return row != nullptr && row->to_float != nullptr;
}

uint64_t type_bytes(GgmlType type, int64_t n) {
  const Row& row = row_of("type_bytes", type);
  require(n >= 0 && n % row.layout.block == 0, "type_bytes", "element count ", n, " is not a multiple of ",
          row.layout.name, "'s block size ", row.layout.block);
  return uint64_t(n / row.layout.block) * uint64_t(row.layout.bytes);
}

void quantize_rows(GgmlType type, const float* in, void* out, int64_t n, Backend backend) {
  const Row& row = convertible_row("quantize_rows", type, n);
  backend = resolve(backend);
  require(backend != Backend::cuda, "quantize_rows", "works on host memory; backend 'cuda' is not accepted");
  const kernels::QuantizeKernel kernel = kernels::quantize_kernel(type, backend);
  const int64_t block = row.layout.block, bytes = row.layout.bytes;
  auto* dst = static_cast<uint8_t*>(out);
  parallel_for(n / block, grain_blocks(row.layout), [&](int64_t b0, int64_t b1) {
    if (kernel != nullptr)
      kernel(in + b0 * block, dst + b0 * bytes, b1 - b0);
    else
      row.from_float(in + b0 * block, dst + b0 * bytes, (b1 - b0) * block);
  });
}

void dequantize_rows(GgmlType type, const void* in, float* out, int64_t n, Backend backend) {
  const Row& row = convertible_row("dequantize_rows", type, n);
  backend = resolve(backend);
  require(backend != Backend::cuda, "dequantize_rows", "works on host memory; backend 'cuda' is not accepted");
  const int64_t block = row.layout.block, bytes = row.layout.bytes;
  const auto* src = static_cast<const uint8_t*>(in);
  parallel_for(n / block, grain_blocks(row.layout), [&](int64_t b0, int64_t b1) {
    row.to_float(src + b0 * bytes, out + b0 * block, (b1 - b0) * block);
  });
}

}  // namespace halo::gguf
