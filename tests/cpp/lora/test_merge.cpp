// LoRA merge arithmetic against a naive double-precision product, and the
// half-precision rounding order (delta rounded to W's dtype, then one rounding).
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "halo/core/convert.hpp"
#include "halo/core/error.hpp"
#include "halo/lora/merge.hpp"
#include "tests/cpp/random.hpp"

using namespace halo;

namespace {

// delta[o, k] = scaling * sum_r B[o, r] A[r, k], in double.
double naive_delta(const std::vector<float>& a, const std::vector<float>& b, int64_t in, int64_t rank, double scaling,
                   int64_t o, int64_t k) {
  double sum = 0;
  for (int64_t r = 0; r < rank; ++r) sum += double(b[o * rank + r]) * double(a[r * in + k]);
  return sum * scaling;
}
}  // namespace

TEST_CASE("delta_weight and merge_inplace equal the naive product", "[merge]") {
  for (bool fan : {false, true}) {
    const int64_t out = 37, in = 53, rank = 5;
    const float scaling = 2.5f;
    const auto a = test::normal(rank * in, 1, 0.3f), b = test::normal(out * rank, 2, 0.3f);
    const auto w = test::normal(out * in, 3, 1.0f);
    std::vector<float> delta(out * in), merged = w;
    lora::delta_weight(delta.data(), out, in, a.data(), b.data(), rank, scaling, fan);
    lora::merge_inplace(merged.data(), out, in, a.data(), b.data(), rank, scaling, fan);
    for (int64_t o = 0; o < out; ++o)
      for (int64_t k = 0; k < in; ++k) {
        const int64_t at = fan ? k * out + o : o * in + k;  // Conv1D stores [in, out]
        const double expected = naive_delta(a, b, in, rank, scaling, o, k);
        REQUIRE(delta[at] == Approx(expected).margin(1e-6));
        REQUIRE(merged[at] == Approx(double(w[at]) + expected).margin(1e-6));
      }
    lora::merge_inplace(merged.data(), out, in, a.data(), b.data(), rank, scaling, fan, /*subtract=*/true);
    for (int64_t i = 0; i < out * in; ++i) REQUIRE(merged[i] == Approx(w[i]).margin(1e-6));
  }
  std::vector<float> x(4);
  CHECK_THROWS_AS(lora::merge_inplace(x.data(), 2, 2, x.data(), x.data(), 0, 1.0f, false), InvalidArgument);
}

TEST_CASE("half-precision merge rounds the delta first, then the sum once", "[merge]") {
  const int64_t out = 16, in = 24, rank = 4;
  const float scaling = 0.75f;
  const auto a = test::normal(rank * in, 4, 0.1f), b = test::normal(out * rank, 5, 0.1f);
  const auto w = test::normal(out * in, 6, 0.05f);
  std::vector<float> delta(out * in);
  lora::delta_weight(delta.data(), out, in, a.data(), b.data(), rank, scaling, false);
  for (Format dtype : {Format::f16, Format::bf16}) {
    for (bool subtract : {false, true}) {
      std::vector<uint16_t> weight(out * in), merged(out * in);
      for (size_t i = 0; i < weight.size(); ++i) store_from_float(weight.data(), dtype, int64_t(i), w[i]);
      lora::merge_weight(weight.data(), dtype, merged.data(), out, in, a.data(), b.data(), rank, scaling, false,
                         subtract);
      for (size_t i = 0; i < weight.size(); ++i) {
        // Independent: round with the float32 round trip of each format's definition.
        const float wi = load_as_float(weight.data(), dtype, int64_t(i));
        uint16_t d16;
        store_from_float(&d16, dtype, 0, delta[i]);
        const float di = load_as_float(&d16, dtype, 0);
        uint16_t expected;
        store_from_float(&expected, dtype, 0, subtract ? wi - di : wi + di);
        REQUIRE(merged[i] == expected);
      }
      // In place (out aliases W) gives the same bytes.
      std::vector<uint16_t> in_place = weight;
      lora::merge_weight(in_place.data(), dtype, in_place.data(), out, in, a.data(), b.data(), rank, scaling, false,
                         subtract);
      CHECK(in_place == merged);
    }
  }
  std::vector<double> doubles(out * in);
  CHECK_THROWS_AS(lora::merge_weight(doubles.data(), Format::f64, doubles.data(), out, in, a.data(), b.data(), rank,
                                     scaling, false, false),
                  TypeMismatch);
}
