// HALO hardware model, code books, sparse part, plan and quantizer invariants.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <set>

#include "halo/core/error.hpp"
#include "halo/hwq/quantizer.hpp"

using namespace halo::hwq;

TEST_CASE("structural delay grows with rows, span and sign", "[hwq]") {
  CHECK(active_rows(7) == 3);
  CHECK(active_rows(-8) == 1);
  CHECK(bit_span(5) == 3);
  CHECK(bit_span(6) == 2);
  CHECK(bit_span(0) == 0);
  const HardwareModel model = HardwareModel::default_model();
  CHECK(model.delay(4, 1) < model.delay(4, 3));   // one row vs two
  CHECK(model.delay(4, 3) < model.delay(4, 5));   // same rows, wider span
  CHECK(model.delay(4, 5) < model.delay(4, -5));  // sign
  CHECK(model.delay(8, 0) < model.delay(8, 1));
  CHECK(model.code_book(4, 2) == std::vector<int>{-8, -4, -2, -1, 0, 1, 2, 4});
  CHECK(model.code_book(4, 0).size() == 16);
  CHECK(model.nominal_point(4) == 0);
  CHECK(model.nominal_point(8) == 0);
}

TEST_CASE("JSON round trip and rejection of bad tables", "[hwq]") {
  const HardwareModel model = HardwareModel::default_model();
  const HardwareModel back = from_json(to_json(model));
  CHECK(back.delay4 == model.delay4);
  CHECK(back.delay8 == model.delay8);
  CHECK(back.points.size() == 3);
  CHECK(back.points[2].frequency_ghz == 3.7);
  CHECK_THROWS_AS(from_json("[1, 2"), halo::FormatError);
  std::string text = to_json(model);
  text.replace(text.find("\"mac_array\""), 11, "\"mac_arrayX\"");
  CHECK_THROWS_WITH(from_json(text), Catch::Contains("mac_array"));
  HardwareModel bad = model;
  bad.points[1].frequency_ghz = 1.0;
  CHECK_THROWS_WITH(bad.validate("t"), Catch::Contains("ascending"));
  bad = model;
  bad.delay4.pop_back();
  CHECK_THROWS_WITH(bad.validate("t"), Catch::Contains("delay4"));
}

TEST_CASE("plan respects the switch budget and never runs a tile too fast", "[hwq]") {
  const HardwareModel model = HardwareModel::default_model();
  const std::vector<int> wanted{2, 0, 1, 2, 1, 0, 2, 2};
  const std::vector<int64_t> macs(wanted.size(), 1 << 22);
  for (int budget = 0; budget <= 3; ++budget) {
    const Plan plan = plan_dvfs(wanted, macs, model, budget);
    int switches = 0;
    for (size_t i = 1; i < plan.order.size(); ++i) switches += plan.point[plan.order[i]] != plan.point[plan.order[i - 1]];
    CHECK(switches == plan.switches);
    CHECK(plan.switches <= budget);
    for (size_t t = 0; t < wanted.size(); ++t) CHECK(plan.point[t] <= wanted[t]);
    if (budget >= 2) CHECK(plan.point == wanted);
  }
  CHECK_THROWS_AS(plan_dvfs(wanted, macs, model, -1), halo::InvalidArgument);
}

TEST_CASE("quantizer: tiles use admitted values, sparse part exact, dequantize consistent", "[hwq]") {
  const int64_t rows = 70, cols = 90;
  std::mt19937 rng(3);
  std::student_t_distribution<float> dist(4.0f);
  std::vector<float> w(rows * cols);
  for (auto& v : w) v = 0.02f * dist(rng);
  const HardwareModel model = HardwareModel::default_model();
  QuantizeOptions options;
  options.tile_rows = 32;
  options.tile_cols = 32;
  options.tier_fractions = {0.3, 0.3, 0.4};
  options.salient_fraction = 0.01;
  const Quantized q = halo_quantize(w.data(), nullptr, rows, cols, model, options);
  std::vector<float> out(rows * cols);
  dequantize(q, out.data());
  const int64_t gcols = q.grid.grid_cols();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t tile = (r / 32) * gcols + c / 32;
      const auto book = model.code_book(4, q.plan.point[tile]);
      REQUIRE(std::find(book.begin(), book.end(), q.codes[r * cols + c]) != book.end());
    }
  }
  int64_t kept = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = q.sparse.indptr[r]; k < q.sparse.indptr[r + 1]; ++k, ++kept) {
      CHECK(out[r * cols + q.sparse.indices[k]] == w[r * cols + q.sparse.indices[k]]);
    }
  }
  CHECK(kept >= static_cast<int64_t>(std::ceil(0.01 * rows * cols)));
  // Every tile on the fastest clock, no side part: the estimate reduces to the clock and power ratios.
  QuantizeOptions fast = options;
  fast.tier_fractions = {0.0, 0.0, 1.0};
  fast.salient_fraction = 0.0;
  fast.outlier_sigma = 0.0;
  const Estimate e = estimate(halo_quantize(w.data(), nullptr, rows, cols, model, fast), model);
  CHECK(e.speedup == Approx(3.7 / 1.9));
  const double per_op_fast = (model.points[2].power_w + model.static_power_w) / 3.7;
  const double per_op_nominal = (model.points[0].power_w + model.static_power_w) / 1.9;
  CHECK(e.energy_saving == Approx(1.0 - per_op_fast / per_op_nominal));
  CHECK(e.average_bits == Approx(3.0 + 32.0 * rows * 3 / (rows * cols) + 64.0 * (rows + 1) / (rows * cols)));
  std::vector<float> nan_w = w;
  nan_w[5] = NAN;
  CHECK_THROWS_WITH(halo_quantize(nan_w.data(), nullptr, rows, cols, model, options), Catch::Contains("non-finite"));
}

TEST_CASE("nearest code breaks ties toward the smaller value", "[hwq]") {
  const std::vector<float> book{-8, -4, -2, -1, 0, 1, 2, 4};
  CHECK(nearest_code(3.0f, book) == 6);  // between 2 and 4: tie -> 2
  CHECK(nearest_code(-100.0f, book) == 0);
  CHECK(nearest_code(100.0f, book) == 7);
  CHECK(nearest_code(0.4f, book) == 4);
}

TEST_CASE("AVX-512 scale search agrees with the scalar loop", "[hwq]") {
  if (!halo::backend_available(halo::Backend::avx512)) return;
  std::mt19937 rng(11);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const std::vector<float> book{-8, -4, -2, -1, 0, 1, 2, 4};
  for (int64_t count : {1, 15, 16, 17, 31, 33, 128, 129}) {
    std::vector<float> x(count), s(count);
    for (auto& v : x) v = dist(rng);
    for (auto& v : s) v = std::fabs(dist(rng));
    const ScaleFit scalar = fit_scale(x.data(), s.data(), count, book, halo::Backend::scalar);
    const ScaleFit simd = fit_scale(x.data(), s.data(), count, book, halo::Backend::avx512);
    CHECK(simd.scale == scalar.scale);
    CHECK(simd.error == Approx(scalar.error).epsilon(1e-12));
  }
  std::vector<float> zeros(40, 0.0f), ones(40, 1.0f);
  CHECK(fit_scale(zeros.data(), ones.data(), 40, book, halo::Backend::avx512).scale == 0.0f);
}
