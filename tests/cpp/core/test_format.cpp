// The format table against facts typed in from the formats' own definitions
// (ggml's type ids and block sizes, safetensors' dtype names), and the row codecs
// against the element conversions and hand-decoded float8 values.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <vector>

#include "halo/core/convert.hpp"
#include "halo/core/error.hpp"
#include "halo/core/format.hpp"

using namespace halo;

TEST_CASE("every row sits at its enum's index", "[format]") {
  for (size_t i = 0; i < kFormats.size(); ++i) {
    INFO("row " << i << " " << kFormats[i].name);
    CHECK(static_cast<size_t>(kFormats[i].format) == i);
    CHECK(format_from_name(kFormats[i].name) == kFormats[i].format);
  }
}

TEST_CASE("GGUF rows carry ggml's type ids and block shapes", "[format]") {
  struct Fact {
    Format format;
    int type;
    int64_t elems, bytes;
  };
  // ggml.h / gguf-py GGML_QUANT_SIZES.
  const Fact facts[] = {{Format::f32, 0, 1, 4},      {Format::f16, 1, 1, 2},      {Format::q4_0, 2, 32, 18},
                        {Format::q4_1, 3, 32, 20},   {Format::q5_0, 6, 32, 22},   {Format::q5_1, 7, 32, 24},
                        {Format::q8_0, 8, 32, 34},   {Format::q2_k, 10, 256, 84}, {Format::q3_k, 11, 256, 110},
                        {Format::q4_k, 12, 256, 144}, {Format::q5_k, 13, 256, 176}, {Format::q6_k, 14, 256, 210},
                        {Format::q8_k, 15, 256, 292}, {Format::i8, 24, 1, 1},      {Format::i16, 25, 1, 2},
                        {Format::i32, 26, 1, 4},     {Format::i64, 27, 1, 8},     {Format::f64, 28, 1, 8},
                        {Format::bf16, 30, 1, 2}};
  for (const Fact& f : facts) {
    INFO(format_name(f.format));
    CHECK(traits(f.format).ggml_type == f.type);
    CHECK(format_from_ggml_type(f.type) == f.format);
    CHECK(traits(f.format).block_elems == f.elems);
    CHECK(traits(f.format).block_bytes == f.bytes);
    CHECK(traits(f.format).bits_per_element == Approx(8.0 * f.bytes / f.elems));
  }
  CHECK_FALSE(format_from_ggml_type(4).has_value());  // Q4_2, removed from ggml
  CHECK(storage_bytes(Format::q4_k, 512) == 288);
  CHECK(storage_bytes(Format::nf4, 64) == -1);
}

TEST_CASE("safetensors names are the format's own", "[format]") {
  const char* names[] = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
                         "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"};
  const int64_t sizes[] = {8, 4, 2, 2, 8, 4, 2, 1, 1, 1, 1, 1, 1, 1};
  for (size_t i = 0; i < std::size(names); ++i) {
    INFO(names[i]);
    const Format f = parse_safetensors_dtype("test", names[i]);
    CHECK(traits(f).safetensors == names[i]);
    CHECK(element_size(f) == sizes[i]);
  }
  CHECK_THROWS_WITH(parse_safetensors_dtype("reader", "F4"),
                    Catch::Contains("[reader]") && Catch::Contains("\"F4\"") && Catch::Contains("BF16"));
  CHECK_THROWS_AS(parse_safetensors_dtype("reader", "nf4"), InvalidArgument);
}

TEST_CASE("parsers refuse what their callers cannot take", "[format]") {
  CHECK(parse_kernel_float("f", "bfloat16") == Format::bf16);
  CHECK_THROWS_AS(parse_kernel_float("f", "float64"), TypeMismatch);
  CHECK_THROWS_AS(parse_kernel_float("f", "nf4"), TypeMismatch);
  CHECK(parse_bnb4("f", "fp4") == Format::fp4);
  CHECK_THROWS_WITH(parse_bnb4("quantize", "q4_0"), Catch::Contains("nf4, fp4") && Catch::Contains("'q4_0'"));
  CHECK_THROWS_WITH(parse_format("x", "float33"), Catch::Contains("float33") && Catch::Contains("q6_k"));
  for (int64_t b = 1; b <= 8192; ++b) {
    const bool power = (b & (b - 1)) == 0 && b >= 32 && b <= 4096;
    CHECK(valid_bnb4_blocksize(b) == power);
  }
  CHECK_THROWS_WITH(check_bnb4("q", Format::nf4, 48), Catch::Contains("[q]") && Catch::Contains("48"));
  CHECK_THROWS_WITH(check_bnb4("q", Format::q4_0, 64), Catch::Contains("not a bitsandbytes"));
}

TEST_CASE("element row codecs equal the scalar conversions on every half", "[format]") {
  std::vector<uint16_t> halves(65536);
  for (uint32_t i = 0; i < 65536; ++i) halves[i] = uint16_t(i);
  std::vector<float> out(65536);
  for (Format f : {Format::f16, Format::bf16}) {
    to_float(f, halves.data(), out.data(), 65536);
    for (uint32_t i = 0; i < 65536; ++i) {
      const float expected = f == Format::f16 ? f16_to_float(uint16_t(i)) : bf16_to_float(uint16_t(i));
      REQUIRE(std::memcmp(&out[i], &expected, 4) == 0);
    }
    std::vector<uint16_t> back(65536);
    from_float(f, out.data(), back.data(), 65536);
    for (uint32_t i = 0; i < 65536; ++i) {
      if (std::isnan(out[i])) continue;  // NaN payloads are canonicalized
      REQUIRE(back[i] == halves[i]);
    }
  }
  const double wide[] = {1.0, -0.1, 1e300, 1e-300};
  float narrow[4];
  to_float(Format::f64, wide, narrow, 4);
  CHECK(narrow[1] == float(-0.1));
  CHECK(std::isinf(narrow[2]));
  CHECK(narrow[3] == 0.0f);
}

TEST_CASE("float8 rows decode hand-checked values", "[format]") {
  struct Case {
    Format format;
    uint8_t bits;
    float value;
  };
  const Case cases[] = {
      {Format::f8_e4m3, 0x7e, 448.0f},       {Format::f8_e4m3, 0x01, 0.001953125f},  // 2^-9, smallest subnormal
      {Format::f8_e4m3, 0x38, 1.0f},         {Format::f8_e4m3, 0xb8, -1.0f},
      {Format::f8_e5m2, 0x7b, 57344.0f},     {Format::f8_e5m2, 0x3c, 1.0f},
      {Format::f8_e5m2, 0x7c, INFINITY},     {Format::f8_e5m2, 0x01, 1.52587890625e-05f},  // 2^-16
      {Format::f8_e4m3fnuz, 0x40, 1.0f},     {Format::f8_e4m3fnuz, 0x7f, 240.0f},
      {Format::f8_e5m2fnuz, 0x40, 1.0f},     {Format::f8_e5m2fnuz, 0x7f, 57344.0f},
  };
  for (const Case& c : cases) {
    INFO(format_name(c.format) << " 0x" << std::hex << int(c.bits));
    float got = 0;
    to_float(c.format, &c.bits, &got, 1);
    CHECK(got == c.value);
  }
  for (auto [format, nan_bits] : {std::pair{Format::f8_e4m3, uint8_t(0x7f)}, {Format::f8_e4m3, uint8_t(0xff)},
                                  {Format::f8_e5m2, uint8_t(0x7d)}, {Format::f8_e4m3fnuz, uint8_t(0x80)},
                                  {Format::f8_e5m2fnuz, uint8_t(0x80)}}) {
    float got = 0;
    to_float(format, &nan_bits, &got, 1);
    CHECK(std::isnan(got));
  }
}

TEST_CASE("row conversions refuse formats without a codec and partial blocks", "[format]") {
  float out[64];
  uint8_t bytes[64] = {};
  CHECK_THROWS_WITH(to_float(Format::nf4, bytes, out, 64), Catch::Contains("[to_float]") && Catch::Contains("nf4"));
  CHECK_THROWS_WITH(from_float(Format::i32, out, bytes, 4), Catch::Contains("int32"));
  if (row_codec(Format::q8_0).to_float) {
    CHECK_THROWS_WITH(to_float(Format::q8_0, bytes, out, 31), Catch::Contains("whole number"));
  }
  CHECK_THROWS_AS(to_float(Format::f32, bytes, out, -1), InvalidArgument);
}
