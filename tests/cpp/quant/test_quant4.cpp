// 4-bit kernels: every SIMD level against the scalar reference on awkward
// sizes and values, format facts, and round trips.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "halo/core/error.hpp"
#include "halo/quant/block.hpp"
#include "halo/quant/quant4.hpp"

using namespace halo;

namespace {

std::vector<Backend> cpu_backends() {
  std::vector<Backend> out;
  for (Backend b : available_backends())
    if (b != Backend::cuda) out.push_back(b);
  return out;
}

std::vector<float> make_values(int64_t n, uint32_t seed, int kind) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  if (kind == 1) for (auto& x : v) x = 0.0f;                      // all zeros
  if (kind == 2) for (auto& x : v) x *= 1e30f;                    // huge
  if (kind == 3) for (auto& x : v) x *= 1e-39f;                   // subnormal
  if (kind == 4 && n > 3) {                                       // NaN and inf sprinkled
    v[n / 3] = std::numeric_limits<float>::quiet_NaN();
    v[n - 1] = std::numeric_limits<float>::infinity();
    v[1] = -std::numeric_limits<float>::infinity();
  }
  if (kind == 5) for (int64_t i = 0; i < n; i += 2) v[i] = 0.0f;  // half zeros (ties at thresholds unlikely)
  return v;
}

std::vector<uint16_t> to_half(const std::vector<float>& v, Format dtype) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = dtype == Format::f16 ? float_to_f16(v[i]) : float_to_bf16(v[i]);
  return out;
}

bool same_bits(const float* a, const float* b, int64_t n) { return std::memcmp(a, b, size_t(n) * 4) == 0; }

}  // namespace

TEST_CASE("NF4 and FP4 code books are bitsandbytes' values", "[format]") {
  // Every value, typed in from bitsandbytes' published NF4 table (decimal, as doubles).
  const double nf4[16] = {-1.0,
                          -0.6961928009986877,
                          -0.5250730514526367,
                          -0.39491748809814453,
                          -0.28444138169288635,
                          -0.18477343022823334,
                          -0.09105003625154495,
                          0.0,
                          0.07958029955625534,
                          0.16093020141124725,
                          0.24611230194568634,
                          0.33791524171829224,
                          0.44070982933044434,
                          0.5626170039176941,
                          0.7229568362236023,
                          1.0};
  const double fp4_magnitude[8] = {0, 0.0625, 8, 12, 4, 6, 2, 3};  // / 12; codes 8..15 negated (8 is +0)
  for (int c = 0; c < 16; ++c) {
    INFO("code " << c);
    CHECK(kNF4.code[c] == float(nf4[c]));
    CHECK(kNF4Code[c] == kNF4.code[c]);
    const double fp4 = (c < 8 ? 1 : -1) * fp4_magnitude[c % 8] / 12.0;
    CHECK(kFP4.code[c] == float(fp4));
    CHECK_FALSE(std::signbit(kFP4.code[c]) != (fp4 < 0));
    CHECK(traits(Format::nf4).code_book[c] == kNF4.code[c]);
    CHECK(traits(Format::fp4).code_book[c] == kFP4.code[c]);
  }
  for (int r = 0; r + 1 < 16; ++r) CHECK(kFP4.code[kFP4.code_of_rank[r]] <= kFP4.code[kFP4.code_of_rank[r + 1]]);
  CHECK(kNF4.identity_order);
  CHECK_FALSE(kFP4.identity_order);
  CHECK_THROWS_AS(codebook4(Format::q4_0), InvalidArgument);
  CHECK_THROWS_AS(codebook4(Format::f32), InvalidArgument);
  CHECK(kDynamicMapSigned[127] == 0.0f);
  CHECK(kDynamicMapSigned[255] == 1.0f);
  for (int i = 0; i < 255; ++i) CHECK(kDynamicMapSigned[i] < kDynamicMapSigned[i + 1]);
}

TEST_CASE("encode4 picks the nearest code and sends a tie low", "[format]") {
  for (const Codebook4* f : {&kNF4, &kFP4}) {
    for (int r = 0; r < 15; ++r) {
      const float t = f->thresholds[r];
      CHECK(rank4(*f, t) == r);                                    // exact tie goes low
      CHECK(rank4(*f, std::nextafter(t, 2.0f)) == r + 1);
    }
    CHECK(rank4(*f, std::numeric_limits<float>::quiet_NaN()) == 15);
    // nearest: brute force over many values
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (int k = 0; k < 20000; ++k) {
      float x = u(rng);
      int best = 0;
      for (int c = 1; c < 16; ++c)
        if (std::fabs(double(x) - f->code[c]) < std::fabs(double(x) - f->code[best])) best = c;
      CHECK(f->code[encode4(*f, x)] == f->code[best]);
    }
  }
}

TEST_CASE("SIMD quantize and dequantize equal the scalar reference bit for bit", "[simd]") {
  const std::vector<int64_t> sizes = {1, 2, 31, 32, 33, 63, 64, 65, 127, 129, 255, 257, 1000, 4097, 8193, 70001};
  for (Backend backend : cpu_backends()) {
    if (backend == Backend::scalar) continue;
    for (Format type : {Format::nf4, Format::fp4})
      for (int64_t blocksize : {32, 64, 128, 256, 512, 1024, 2048, 4096})
        for (int64_t n : sizes)
          for (int kind : {0, 1, 2, 3, 4, 5})
            for (Format dtype : {Format::f32, Format::f16, Format::bf16}) {
              if (n > 10000 && (kind != 0 || blocksize != 64)) continue;
              INFO("backend " << backend_name(backend) << " type " << int(type) << " blocksize " << blocksize
                              << " n " << n << " kind " << kind << " dtype " << format_name(dtype));
              const auto values = make_values(n, uint32_t(n * 131 + kind), kind);
              const auto halves = to_half(values, dtype);
              const void* input = dtype == Format::f32 ? static_cast<const void*>(values.data()) : halves.data();
              std::vector<uint8_t> p_ref(packed_size(n)), p_simd(packed_size(n));
              std::vector<float> a_ref(num_blocks(n, blocksize)), a_simd(num_blocks(n, blocksize));
              quantize_4bit(input, dtype, n, type, blocksize, p_ref.data(), a_ref.data(), Backend::scalar);
              quantize_4bit(input, dtype, n, type, blocksize, p_simd.data(), a_simd.data(), backend);
              REQUIRE(p_ref == p_simd);
              REQUIRE(same_bits(a_ref.data(), a_simd.data(), int64_t(a_ref.size())));
              for (Format out : {Format::f32, Format::f16, Format::bf16}) {
                std::vector<char> d_ref(size_t(n) * element_size(out)), d_simd(size_t(n) * element_size(out));
                dequantize_4bit(p_ref.data(), a_ref.data(), n, type, blocksize, d_ref.data(), out, Backend::scalar);
                dequantize_4bit(p_ref.data(), a_ref.data(), n, type, blocksize, d_simd.data(), out, backend);
                REQUIRE(d_ref == d_simd);
              }
            }
  }
}

TEST_CASE("dequantize_4bit_range equals the matching slice of a full dequantize", "[range]") {
  const int64_t n = 3 * 64 + 17;
  const auto values = make_values(n, 3, 0);
  std::vector<uint8_t> packed(packed_size(n));
  std::vector<float> absmax(num_blocks(n, 64)), full(n);
  quantize_4bit(values.data(), Format::f32, n, Format::nf4, 64, packed.data(), absmax.data());
  dequantize_4bit(packed.data(), absmax.data(), n, Format::nf4, 64, full.data(), Format::f32, Backend::scalar);
  for (Backend backend : cpu_backends())
    for (auto [begin, end] : std::vector<std::pair<int64_t, int64_t>>{{0, n}, {1, 100}, {33, 34}, {63, 129}, {5, n}}) {
      std::vector<float> part(end - begin);
      dequantize_4bit_range(packed.data(), absmax.data(), Format::nf4, 64, begin, end, part.data(), backend);
      REQUIRE(same_bits(part.data(), full.data() + begin, end - begin));
    }
}

TEST_CASE("round trip error is bounded by half the widest code gap times absmax", "[roundtrip]") {
  for (Format type : {Format::nf4, Format::fp4}) {
    const Codebook4& f = codebook4(type);
    float widest = 0.0f;
    for (int r = 0; r < 15; ++r)
      widest = std::max(widest, f.code[f.code_of_rank[r + 1]] - f.code[f.code_of_rank[r]]);
    const int64_t n = 4099;
    const auto values = make_values(n, 11, 0);
    Quantized4 q = quantize_4bit(values.data(), Format::f32, {n}, type, 64);
    std::vector<float> back(n);
    dequantize_4bit(q, back.data(), Format::f32);
    for (int64_t i = 0; i < n; ++i) {
      const float am = q.absmax[i / 64];
      REQUIRE(std::fabs(back[i] - values[i]) <= 0.5f * widest * am * 1.0001f + 1e-30f);
    }
  }
}

TEST_CASE("all-zero blocks store absmax 0 and dequantize to zeros", "[edge]") {
  std::vector<float> zeros(128, 0.0f);
  Quantized4 q = quantize_4bit(zeros.data(), Format::f32, {128}, Format::nf4, 64);
  CHECK(q.absmax == std::vector<float>{0.0f, 0.0f});
  for (uint8_t byte : q.packed) CHECK(byte == 0x77);
  std::vector<float> back(128, 1.0f);
  dequantize_4bit(q, back.data(), Format::f32);
  for (float v : back) CHECK(v == 0.0f);
}

TEST_CASE("double quantization reconstructs absmax closely", "[nested]") {
  const int64_t n = 64 * 1000 + 5;
  const auto values = make_values(n, 5, 0);
  Quantized4 plain = quantize_4bit(values.data(), Format::f32, {n}, Format::nf4, 64, false);
  Quantized4 nested = quantize_4bit(values.data(), Format::f32, {n}, Format::nf4, 64, true);
  REQUIRE(nested.nested.has_value());
  CHECK(nested.packed == plain.packed);
  const auto restored = nested.block_absmax();
  REQUIRE(restored.size() == plain.absmax.size());
  double mean = 0;
  for (float a : plain.absmax) mean += a;
  mean /= double(plain.absmax.size());
  CHECK(std::fabs(nested.nested->offset - mean) < 1e-5 * mean);
  for (size_t i = 0; i < restored.size(); ++i) CHECK(std::fabs(restored[i] - plain.absmax[i]) < 0.02f * plain.absmax[i]);
}

TEST_CASE("bad arguments raise errors naming the function and value", "[errors]") {
  std::vector<float> v(64, 1.0f);
  std::vector<uint8_t> packed(32);
  std::vector<float> absmax(2);
  REQUIRE_THROWS_WITH(quantize_4bit(v.data(), Format::f32, 64, Format::nf4, 48, packed.data(), absmax.data()),
                      Catch::Contains("[quantize_4bit]") && Catch::Contains("48"));
  REQUIRE_THROWS_AS(quantize_4bit(v.data(), Format::f32, 0, Format::nf4, 64, packed.data(), absmax.data()),
                    InvalidArgument);
  REQUIRE_THROWS_WITH(parse_backend("neon"), Catch::Contains("neon"));
}
