// HALO hardware model, JSON schema, code books, kernels, plan and quantizer invariants.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <nlohmann/json.hpp>
#include <set>

#include "halo/backend/dispatch.hpp"
#include "halo/core/error.hpp"
#include "halo/hwq/codebook.hpp"
#include "halo/hwq/quantizer.hpp"
#include "src/hwq/book_table.hpp"
#include "src/hwq/segment_error.hpp"

using namespace halo::hwq;

TEST_CASE("structural delay grows with rows, span and sign, corners scale it", "[hwq]") {
  CHECK(active_rows(7) == 3);
  CHECK(active_rows(-8) == 1);
  CHECK(bit_span(5) == 3);
  CHECK(bit_span(6) == 2);
  CHECK(bit_span(0) == 0);
  const HardwareModel model = HardwareModel::default_model();
  REQUIRE(model.points.size() == 5);
  const size_t nominal = 2;  // (1.0 V, 1.9 GHz)
  CHECK(model.nominal_point(8) == 2);
  CHECK(model.nominal_point(4) == 2);
  CHECK(model.delay(8, 1, nominal) < model.delay(8, 3, nominal));   // one row vs two
  CHECK(model.delay(8, 3, nominal) < model.delay(8, 5, nominal));   // same rows, wider span
  CHECK(model.delay(8, 5, nominal) < model.delay(8, -5, nominal));  // sign
  CHECK(model.delay(8, 5, 4) < model.delay(8, 5, nominal));         // 1.2 V is faster than 1.0 V
  CHECK(model.delay(8, 5, 0) > model.delay(8, 5, nominal));         // 0.8 V is slower
  CHECK(model.admitted(8, nominal).size() == 256);
  CHECK(model.admitted(8, 3).size() == 160);
  CHECK(model.admitted(8, 4) == std::vector<int>{-128, -96, -64, -48, -32, -24, -16, -12, -8, -6, -4, -3, -2, -1, 0,
                                                 1,    2,   3,   4,   6,   8,   12,  16,  24,  32,  48,  64,  96});
  CHECK(model.admitted(4, 4) == std::vector<int>{-8, -4, -2, -1, 0, 1, 2, 4});
  CHECK(model.admitted(4, 3).size() == 15);
  CHECK(model.points[3].book_size == 16);
  CHECK(model.points[4].book_size == 9);
  CHECK(model.ladder(Mode::performance, 8) == std::vector<int>{2, 3, 4});
  CHECK(model.ladder(Mode::energy, 8) == std::vector<int>{2, 1, 0});
  // Energy per MAC: proportional to the active partial-product rows, times V^2.
  CHECK(model.mac_energy_pj(8, 0, nominal) == 0.0);
  CHECK(model.mac_energy_pj(8, -127, nominal) == Approx(7 * 0.03));
  CHECK(model.mac_energy_pj(8, 64, 4) == Approx(0.03 * 1.44));
  CHECK(model.mac_energy_pj(8, -128, 0) == Approx(0.03 * 0.64));
}

TEST_CASE("JSON round trip, version 1 documents, and rejection of bad fields", "[hwq]") {
  const HardwareModel model = HardwareModel::default_model();
  const HardwareModel back = from_json(to_json(model));
  CHECK(back.delay4 == model.delay4);
  CHECK(back.delay8 == model.delay8);
  CHECK(back.energy8 == model.energy8);
  CHECK(back.points.size() == 5);
  CHECK(back.points[4].frequency_ghz == 3.7);
  CHECK(back.points[4].book_size == 9);
  CHECK(to_json(back) == to_json(model));
  CHECK_THROWS_AS(from_json("[1, 2"), halo::FormatError);

  // A version-1 document (single delay tables, power per point, sparse_macs_per_cycle) still loads.
  nlohmann::json v1;
  v1["schema"] = "halo.hwq.hardware_model";
  v1["version"] = 1;
  v1["delay_ns"] = {{"int4", std::vector<double>(16, 0.2)}, {"int8", std::vector<double>(256, 0.2)}};
  v1["operating_points"] = {{{"voltage", 1.0}, {"frequency_ghz", 1.9}, {"power_w", 1.0}},
                            {{"voltage", 1.2}, {"frequency_ghz", 3.7}, {"power_w", 2.8}}};
  v1["switch_cost_ns"] = 50;
  v1["switch_energy_nj"] = 5;
  v1["static_power_w"] = 0.5;
  v1["mac_array"] = {32, 32};
  v1["sparse_macs_per_cycle"] = 64;
  v1["tile"] = {128, 128};
  const HardwareModel old = from_json(v1.dump());
  CHECK(old.energy_model == EnergyModel::power);
  CHECK(old.delay8.size() == 2);
  CHECK(old.points[1].power_w == 2.8);
  CHECK(old.sparse.macs_per_cycle == 64);
  CHECK(old.memory.bandwidth_gbps == 0);

  auto with = [&](const char* key, const nlohmann::json& value) {
    nlohmann::json doc = v1;
    doc[key] = value;
    return doc.dump();
  };
  // Integers that do not fit: the message shows the value given, not a wrapped one.
  CHECK_THROWS_WITH(from_json(with("mac_array", {4294967296LL, 4294967296LL})),
                    Catch::Contains("mac_array[0]") && Catch::Contains("4294967296"));
  CHECK_THROWS_WITH(from_json(with("mac_array", {32})), Catch::Contains("mac_array"));
  CHECK_THROWS_WITH(from_json(with("tile", {0, 128})), Catch::Contains("tile[0]"));
  CHECK_THROWS_WITH(from_json(with("sparse_macs_per_cycle", 1e40)), Catch::Contains("sparse_macs_per_cycle"));
  CHECK_THROWS_WITH(from_json(with("colour", "red")), Catch::Contains("unknown field 'colour'"));
  CHECK_THROWS_WITH(from_json(with("version", 3)), Catch::Contains("version"));
  nlohmann::json missing = v1;
  missing.erase("switch_cost_ns");
  CHECK_THROWS_WITH(from_json(missing.dump()), Catch::Contains("switch_cost_ns"));

  HardwareModel bad = model;
  bad.points[3].frequency_ghz = 1.0;
  CHECK_THROWS_WITH(bad.validate("t"), Catch::Contains("ascending"));
  bad = model;
  bad.delay4[1].pop_back();
  CHECK_THROWS_WITH(bad.validate("t"), Catch::Contains("delay_ns.int4"));
  bad = model;
  bad.points[0].book_size = 0;
  CHECK_THROWS_WITH(bad.validate("t"), Catch::Contains("book_size"));
}

TEST_CASE("best book: exact optimum over admitted values on small cases", "[hwq]") {
  std::mt19937 rng(5);
  std::normal_distribution<double> normal(0.0, 20.0);
  std::uniform_real_distribution<double> unit(0.1, 1.0);
  const std::vector<int> admitted{-64, -32, -24, -16, -8, -4, 0, 3, 8, 12, 16, 40, 64};
  WeightedHistogram histogram;
  for (int i = 0; i < 3000; ++i) histogram.add(normal(rng), unit(rng));
  for (int size : {1, 2, 3, 4}) {
    const std::vector<int> book = best_book(histogram, admitted, size);
    REQUIRE(static_cast<int>(book.size()) == size);
    // Brute force over every subset of that size.
    double best = std::numeric_limits<double>::infinity();
    const int n = static_cast<int>(admitted.size());
    for (int mask = 0; mask < (1 << n); ++mask) {
      if (__builtin_popcount(mask) != size) continue;
      std::vector<int> subset;
      for (int i = 0; i < n; ++i)
        if (mask & (1 << i)) subset.push_back(admitted[i]);
      best = std::min(best, book_cost(histogram, subset));
    }
    CHECK(book_cost(histogram, book) == Approx(best).epsilon(1e-12));
  }
  CHECK(best_book(histogram, admitted, 40) == admitted);
  CHECK_THROWS_AS(best_book(histogram, {3, 1}, 1), halo::InvalidArgument);
}

TEST_CASE("every segment-error kernel agrees with the scalar reference", "[hwq]") {
  std::mt19937 rng(11);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const std::vector<std::vector<float>> books{{-8, -4, -2, -1, 0, 1, 2, 4},
                                              {-128, -96, -64, -48, -24, -3, 0, 5, 17, 64, 96, 127},
                                              {3}};
  for (halo::Backend backend : {halo::Backend::avx2, halo::Backend::avx512}) {
    if (!halo::backend_available(backend)) continue;
    const auto kernel = detail::segment_error_kernel(backend);
    for (const auto& values : books) {
      const detail::BookTable table(values);
      for (int64_t count : {1, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 128, 129}) {
        std::vector<float> x(count), s(count);
        for (auto& v : x) v = dist(rng) * 40.0f;
        for (auto& v : s) v = std::fabs(dist(rng));
        if (count > 3) x[2] = 0.5f * (values.front() + values.back());  // a tie somewhere
        for (float scale : {0.0f, 1.0f, 0.37f, 3.0f}) {
          const double reference = detail::segment_error_scalar(x.data(), s.data(), count, table.view(), scale);
          CHECK(kernel(x.data(), s.data(), count, table.view(), scale) == Approx(reference).epsilon(1e-12));
        }
        const ScaleFit scalar = fit_scale(x.data(), s.data(), count, values, halo::Backend::scalar);
        const ScaleFit simd = fit_scale(x.data(), s.data(), count, values, backend);
        CHECK(simd.scale == scalar.scale);
        CHECK(simd.error == Approx(scalar.error).epsilon(1e-12));
      }
      // NaN and infinities pick the first / last code exactly as the scalar rule does.
      std::vector<float> odd{NAN, INFINITY, -INFINITY, 0.0f, 1e30f, -1e30f, 2.5f, -2.5f, 1.5f};
      std::vector<float> ones(odd.size(), 1.0f);
      std::vector<float> clean(odd.size(), 0.0f);
      for (size_t i = 0; i < odd.size(); ++i) clean[i] = std::isfinite(odd[i]) ? odd[i] : 0.0f;
      // Error with x = clean and the ratio taken from `odd` is not expressible; compare the codes directly.
      for (size_t i = 0; i < odd.size(); ++i) {
        std::vector<float> one(16, odd[i]), weight(16, 0.0f);
        weight[0] = 1.0f;  // only the first lane counts; every lane decides
        const double a = detail::segment_error_scalar(one.data(), weight.data(), 16, table.view(), 1.0f);
        const double b = kernel(one.data(), weight.data(), 16, table.view(), 1.0f);
        if (std::isnan(a)) {
          CHECK(std::isnan(b));
        } else {
          CHECK(b == Approx(a));
        }
      }
    }
  }
  CHECK_THROWS_AS(detail::segment_error_kernel(halo::Backend::cuda), std::exception);
  // Each CPU backend runs its own kernel (avx2 used to fall back to the scalar loop silently), and the
  // table is in the registry's inventory.
  CHECK(detail::segment_error_kernel(halo::Backend::scalar) == &detail::segment_error_scalar);
  if (halo::backend_available(halo::Backend::avx2))
    CHECK(detail::segment_error_kernel(halo::Backend::avx2) == &detail::segment_error_avx2);
  if (halo::backend_available(halo::Backend::avx512))
    CHECK(detail::segment_error_kernel(halo::Backend::avx512) == &detail::segment_error_avx512);
  bool listed = false;
  for (const auto& entry : halo::kernel_inventory()) {
    if (entry.op != "hwq_segment_error") continue;
    listed = true;
    CHECK(entry.backends == std::vector<halo::Backend>{halo::Backend::scalar, halo::Backend::avx2,
                                                      halo::Backend::avx512});
  }
  CHECK(listed);
}

TEST_CASE("plan respects the switch budget and never runs a tile past its rung", "[hwq]") {
  const HardwareModel model = HardwareModel::default_model();
  const std::vector<int> wanted{2, 0, 1, 2, 1, 0, 2, 2};
  const std::vector<int64_t> macs(wanted.size(), 1 << 22);
  const std::vector<int> ladder = model.ladder(Mode::performance, 8);
  for (int budget = 0; budget <= 3; ++budget) {
    const Plan plan = plan_dvfs(wanted, macs, model, budget);
    int switches = 0;
    for (size_t i = 1; i < plan.order.size(); ++i) switches += plan.point[plan.order[i]] != plan.point[plan.order[i - 1]];
    CHECK(switches == plan.switches);
    CHECK(plan.switches <= budget);
    for (size_t t = 0; t < wanted.size(); ++t) {
      const int rung = static_cast<int>(std::find(ladder.begin(), ladder.end(), plan.point[t]) - ladder.begin());
      CHECK(rung <= wanted[t]);
      if (budget >= 2) CHECK(rung == wanted[t]);
    }
  }
  CHECK_THROWS_AS(plan_dvfs(wanted, macs, model, -1), halo::InvalidArgument);
  CHECK_THROWS_AS(plan_dvfs({3}, {1}, model, 1), halo::InvalidArgument);
}

namespace {

std::vector<float> heavy_tailed(int64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::student_t_distribution<float> dist(4.0f);
  std::vector<float> w(n);
  for (auto& v : w) v = 0.02f * dist(rng);
  return w;
}

}  // namespace

TEST_CASE("quantizer: books drawn from admitted values, sparse part exact, estimate consistent", "[hwq]") {
  const int64_t rows = 70, cols = 90;
  const std::vector<float> w = heavy_tailed(rows * cols, 3);
  const HardwareModel model = HardwareModel::default_model();
  QuantizeOptions options;
  options.tile_rows = 32;
  options.tile_cols = 32;
  options.salient_fraction = 0.01;
  options.sparse_fp16 = false;  // kept weights restored exactly
  const Quantized q = halo_quantize(w.data(), nullptr, rows, cols, model, options);
  REQUIRE(q.books.size() == 3);
  for (size_t r = 0; r < q.books.size(); ++r) {
    const auto admitted = model.admitted(8, q.ladder[r]);
    CHECK(static_cast<int>(q.books[r].size()) <= model.points[q.ladder[r]].book_size);
    for (int v : q.books[r]) CHECK(std::find(admitted.begin(), admitted.end(), v) != admitted.end());
  }
  std::vector<float> out(rows * cols);
  dequantize(q, out.data());
  const int64_t gcols = q.grid.grid_cols();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t tile = (r / 32) * gcols + c / 32;
      const size_t rung = std::find(q.ladder.begin(), q.ladder.end(), q.plan.point[tile]) - q.ladder.begin();
      const auto& book = q.books[rung];
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

  // Every tile on the 3.7 GHz rung, no side part, no memory term: the speed-up is the clock ratio, and the
  // dynamic energy is the codes' table energies at 1.44 V^2.
  HardwareModel compute_only = model;
  compute_only.memory = {0.0, 0.0};
  QuantizeOptions fast = options;
  fast.split = {0.0, 0.0};
  fast.salient_fraction = 0.0;
  fast.outlier_sigma = 0.0;
  const Quantized all_fast = halo_quantize(w.data(), nullptr, rows, cols, compute_only, fast);
  const Estimate e = estimate(all_fast, compute_only);
  CHECK(e.speedup == Approx(3.7 / 1.9));
  CHECK(e.halo.latency_ns == Approx(rows * cols * 128.0 / 1024.0 / 3.7));
  double pj = 0;
  for (int8_t code : all_fast.codes) pj += structural_energy_pj(code);
  CHECK(e.halo.dynamic_nj == Approx(1e-3 * pj * 1.44 * 128));
  // 9 values -> 4-bit indices, one fp32 scale per row per tile column, the 9-entry INT8 table.
  CHECK(e.average_bits == Approx(4.0 + (32.0 * rows * 3 + 8.0 * 9) / (rows * cols)));
  CHECK(e.w8a8.bits == Approx(8.0 + 32.0 / cols));
  CHECK(e.fp16.energy_nj == Approx(1e-3 * rows * cols * 128.0 * 1.0 + e.fp16.leakage_nj));

  std::vector<float> nan_w = w;
  nan_w[5] = NAN;
  CHECK_THROWS_WITH(halo_quantize(nan_w.data(), nullptr, rows, cols, model, options), Catch::Contains("non-finite"));
  QuantizeOptions bad = options;
  bad.split = {0.5};
  CHECK_THROWS_WITH(halo_quantize(w.data(), nullptr, rows, cols, model, bad), Catch::Contains("split"));
}

TEST_CASE("rtn_quantize refuses an empty matrix before dividing by its group", "[hwq]") {
  CHECK_THROWS_WITH(rtn_groups(4, 0, 4, 128), Catch::Contains("non-empty"));
  CHECK(rtn_groups(4, 300, 4, 128) == 3);
  CHECK(rtn_groups(4, 300, 4, 0) == 1);
}

TEST_CASE("nearest code breaks ties toward the smaller value", "[hwq]") {
  const std::vector<float> book{-8, -4, -2, -1, 0, 1, 2, 4};
  CHECK(nearest_code(3.0f, book) == 6);  // between 2 and 4: tie -> 2
  CHECK(nearest_code(-100.0f, book) == 0);
  CHECK(nearest_code(100.0f, book) == 7);
  CHECK(nearest_code(0.4f, book) == 4);
  const detail::BookTable table(book);
  for (float x = -10.0f; x <= 10.0f; x += 0.125f) CHECK(table.nearest(x) == nearest_code(x, book));
}
