// GGUF block types: the SIMD quantizers against the scalar reference rows on
// awkward sizes and inputs, hand-checked small cases, and the format table's
// GGUF rows pointing at the same functions. (Equality with ggml's own bytes is
// tested from Python against llama.cpp's library and gguf-py.)
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "halo/backend/backend.hpp"
#include "halo/core/error.hpp"
#include "halo/core/format.hpp"
#include "halo/gguf/convert.hpp"
#include "halo/gguf/quants.hpp"

using namespace halo;
using namespace halo::gguf;

namespace {

std::vector<float> make_input(const std::string& kind, int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> x(size_t(n), 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float g = normal(rng);
    if (kind == "normal") x[i] = g;
    if (kind == "positive") x[i] = std::fabs(g) + 0.5f;
    if (kind == "negative") x[i] = -std::fabs(g);
    if (kind == "tiny") x[i] = g * 1e-30f;
    if (kind == "huge") x[i] = g * 1e30f;
    if (kind == "constant") x[i] = -0.25f;
    if (kind == "sparse") x[i] = (i % 37 == 0) ? g : 0.0f;
    if (kind == "integers") x[i] = float(int(g * 4));
    if (kind == "nan") x[i] = (i % 101 == 7) ? std::numeric_limits<float>::quiet_NaN() : g;
    if (kind == "inf") x[i] = (i % 97 == 3) ? -std::numeric_limits<float>::infinity() : g;
    if (kind == "subnormal") x[i] = g * 1e-39f;  // scales whose reciprocal overflows
    if (kind == "signed_zeros") x[i] = (i % 64 < 40) ? -0.0f : g;  // whole blocks of -0
  }
  return x;
}

std::vector<uint8_t> quantize(GgmlType type, const std::vector<float>& x, Backend backend) {
  std::vector<uint8_t> out(type_bytes(type, int64_t(x.size())), 0xAB);
  quantize_rows(type, x.data(), out.data(), int64_t(x.size()), backend);
  return out;
}

}  // namespace

TEST_CASE("SIMD kernels give the scalar reference's bytes", "[gguf]") {
  const GgmlType types[] = {GgmlType::q8_0, GgmlType::q4_0, GgmlType::q5_0,
                            GgmlType::q4_k, GgmlType::q5_k, GgmlType::q6_k};
  const char* kinds[] = {"normal", "positive", "negative", "zeros", "tiny", "huge", "constant", "sparse",
                         "integers", "nan", "inf", "subnormal", "signed_zeros"};
  // 1, 2, 3 and 5 super-blocks: odd counts leave a tail for the AVX-512 pairs; 65 spans thread chunks.
  for (int64_t blocks : {1, 2, 3, 5, 65}) {
    for (const char* kind : kinds) {
      const std::vector<float> x = make_input(kind, blocks * 256, uint32_t(blocks * 31 + std::strlen(kind)));
      for (GgmlType type : types) {
        const std::vector<uint8_t> reference = quantize(type, x, Backend::scalar);
        for (Backend b : available_backends()) {
          if (b == Backend::scalar || b == Backend::cuda) continue;
          INFO(type_name(type) << " " << kind << " blocks=" << blocks << " backend=" << backend_name(b));
          CHECK(quantize(type, x, b) == reference);
        }
      }
    }
  }
}

TEST_CASE("threaded quantize_rows equals one call of the scalar row", "[gguf]") {
  const std::vector<float> x = make_input("normal", 256 * 300, 5);
  for (GgmlType type : {GgmlType::q8_0, GgmlType::q4_0, GgmlType::q2_k, GgmlType::q3_k, GgmlType::q6_k}) {
    std::vector<uint8_t> one(type_bytes(type, int64_t(x.size())));
    halo::from_float(*format_from_ggml_type(int(type)), x.data(), one.data(), int64_t(x.size()));
    INFO(type_name(type));
    CHECK(quantize(type, x, Backend::automatic) == one);
  }
}

TEST_CASE("the format table's GGUF rows are the gguf reference rows", "[gguf]") {
  CHECK(row_codec(Format::q4_k).from_float == &from_float_q4_k);
  CHECK(row_codec(Format::q4_k).to_float == &to_float_q4_k);
  CHECK(row_codec(Format::q8_0).from_float == &from_float_q8_0);
  CHECK(row_codec(Format::q6_k).to_float == &to_float_q6_k);
  for (const FormatTraits& t : kFormats) {
    if (t.kind != FormatKind::ggml_block) continue;
    INFO(t.name);
    CHECK(row_codec(t.format).to_float != nullptr);
    CHECK(row_codec(t.format).from_float != nullptr);
    const auto layout = type_layout(uint32_t(t.ggml_type));
    REQUIRE(layout.has_value());
    CHECK(layout->name == t.gguf);
    CHECK(layout->block == t.block_elems);
    CHECK(layout->bytes == t.block_bytes);
    CHECK(convertible(layout->type));
  }
  CHECK_FALSE(convertible(GgmlType::iq2_xxs));
  CHECK(type_layout(uint32_t(GgmlType::iq4_xs))->bytes == 136);
  CHECK_FALSE(type_layout(4).has_value());  // removed Q4_2
}

TEST_CASE("hand-checked blocks: Q8_0 and Q4_0 scales and codes", "[gguf]") {
  // Q8_0: amax 127 gives d = 1 (fp16 0x3c00) and the values themselves as codes; roundf sends
  // 2.5 away from zero.
  std::vector<float> x(32);
  for (int i = 0; i < 32; ++i) x[i] = float(i * 4 - 64);
  x[31] = 127.0f;
  x[5] = 2.5f;
  x[6] = -2.5f;
  std::vector<uint8_t> q8 = quantize(GgmlType::q8_0, x, Backend::scalar);
  CHECK((q8[0] | (q8[1] << 8)) == 0x3c00);
  CHECK(int8_t(q8[2 + 0]) == -64);
  CHECK(int8_t(q8[2 + 5]) == 3);
  CHECK(int8_t(q8[2 + 6]) == -3);
  CHECK(int8_t(q8[2 + 31]) == 127);
  // Q4_0: the value of largest magnitude (-16, first of +-16) sets d = -16 / -8 = 2; x / d + 8.5 truncated.
  for (int i = 0; i < 32; ++i) x[i] = float((i % 16) - 8) * 2.0f;
  x[3] = -16.0f;
  x[20] = 16.0f;
  std::vector<uint8_t> q4 = quantize(GgmlType::q4_0, x, Backend::scalar);
  CHECK((q4[0] | (q4[1] << 8)) == 0x4000);  // fp16 2.0
  std::vector<float> back(32);
  dequantize_rows(GgmlType::q4_0, q4.data(), back.data(), 32);
  for (int i = 0; i < 32; ++i) {
    INFO(i);
    if (i == 20) CHECK(back[i] == 14.0f);  // +16 clamps to code 15 = +7 * 2
    else CHECK(back[i] == x[i]);
  }
}

TEST_CASE("ggml's float16 and bfloat16 rounding, NaN spelled as ggml spells it", "[gguf]") {
  CHECK(fp32_to_fp16(1.0f) == 0x3c00);
  CHECK(fp32_to_fp16(65520.0f) == 0x7c00);             // rounds to infinity
  CHECK(fp32_to_fp16(5.9604645e-08f) == 0x0001);       // smallest subnormal
  CHECK(fp32_to_fp16(-std::numeric_limits<float>::quiet_NaN()) == 0xfe00);
  uint32_t payload_nan = 0x7f812345u;
  float nan;
  std::memcpy(&nan, &payload_nan, 4);
  CHECK(fp32_to_fp16(nan) == 0x7e00);
  CHECK(fp32_to_bf16(nan) == uint16_t(0x7f81 | 0x40));
  CHECK(fp32_to_bf16(1.00390625f) == 0x3f80);          // tie to even
  CHECK(fp32_to_bf16(1.01171875f) == 0x3f82);
}

TEST_CASE("conversion errors name the function and the value", "[gguf]") {
  std::vector<float> x(33);
  std::vector<uint8_t> out(64);
  CHECK_THROWS_WITH(quantize_rows(GgmlType::q4_0, x.data(), out.data(), 33),
                    Catch::Contains("[quantize_rows]") && Catch::Contains("33"));
  CHECK_THROWS_WITH(quantize_rows(GgmlType::iq2_xxs, x.data(), out.data(), 256), Catch::Contains("IQ2_XXS"));
  CHECK_THROWS_WITH(dequantize_rows(GgmlType(4), out.data(), x.data(), 32), Catch::Contains("unknown GGUF tensor type id 4"));
  CHECK_THROWS_WITH(parse_type("q9_9"), Catch::Contains("'q9_9'"));
  CHECK(parse_type("q4_k") == GgmlType::q4_k);
  CHECK(parse_type("BF16") == GgmlType::bf16);
}
