// LoRA forward/backward kernels against a naive double-precision reference,
// for every base storage and every CPU backend of the 4-bit tile dequantizer,
// on awkward sizes (1, 31, 33, 65, tails that do not fill a tile).
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "halo/backend/backend.hpp"
#include "halo/core/convert.hpp"
#include "halo/core/error.hpp"
#include "halo/lora/linear.hpp"
#include "halo/quant/quant4.hpp"
#include "tests/cpp/random.hpp"

using namespace halo;
using namespace halo::lora;

namespace {

struct Reference {
  std::vector<double> y, dx, da, db, dbias;
};

// Textbook loops in double; w is the logical [out, in] weight as float.
Reference naive(const std::vector<float>& x, int64_t rows, const std::vector<double>& w, int64_t out, int64_t in,
                const std::vector<float>& a, const std::vector<float>& b, const std::vector<float>& bias, int64_t rank,
                double scaling, double p, uint64_t seed, const std::vector<float>& dy) {
  Reference ref;
  std::vector<double> xd(rows * in), t(rows * rank, 0.0);
  for (int64_t i = 0; i < rows * in; ++i) xd[i] = dropout_keep(seed, i, p) ? x[i] / (1.0 - p) : 0.0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < rank; ++j)
      for (int64_t k = 0; k < in; ++k) t[r * rank + j] += xd[r * in + k] * a[j * in + k];
  ref.y.assign(rows * out, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double acc = bias.empty() ? 0.0 : bias[o];
      for (int64_t k = 0; k < in; ++k) acc += x[r * in + k] * w[o * in + k];
      for (int64_t j = 0; j < rank; ++j) acc += scaling * t[r * rank + j] * b[o * rank + j];
      ref.y[r * out + o] = acc;
    }
  std::vector<double> dt(rows * rank, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < rank; ++j)
      for (int64_t o = 0; o < out; ++o) dt[r * rank + j] += scaling * dy[r * out + o] * b[o * rank + j];
  ref.db.assign(out * rank, 0.0);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t j = 0; j < rank; ++j)
      for (int64_t r = 0; r < rows; ++r) ref.db[o * rank + j] += scaling * dy[r * out + o] * t[r * rank + j];
  ref.da.assign(rank * in, 0.0);
  for (int64_t j = 0; j < rank; ++j)
    for (int64_t k = 0; k < in; ++k)
      for (int64_t r = 0; r < rows; ++r) ref.da[j * in + k] += dt[r * rank + j] * xd[r * in + k];
  ref.dx.assign(rows * in, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < in; ++k) {
      double base = 0.0, lora = 0.0;
      for (int64_t o = 0; o < out; ++o) base += dy[r * out + o] * w[o * in + k];
      for (int64_t j = 0; j < rank; ++j) lora += dt[r * rank + j] * a[j * in + k];
      ref.dx[r * in + k] = base + (dropout_keep(seed, r * in + k, p) ? lora / (1.0 - p) : 0.0);
    }
  ref.dbias.assign(out, 0.0);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t r = 0; r < rows; ++r) ref.dbias[o] += dy[r * out + o];
  return ref;
}

template <typename Got>
void expect_close(const std::vector<Got>& got, const std::vector<double>& want, double tolerance, const char* what) {
  REQUIRE(got.size() == want.size());
  double worst = 0.0, scale = 1e-30;
  for (size_t i = 0; i < got.size(); ++i) {
    worst = std::max(worst, std::abs(double(got[i]) - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  INFO(what << ": max abs error " << worst << " vs max magnitude " << scale);
  CHECK(worst <= tolerance * scale);
}

struct Case {
  int64_t rows, out, in, rank;
};

void run_case(const Case& c, Format storage, bool fan_in_fan_out, double p, Backend backend, bool with_bias,
              Format qtype = Format::nf4, int64_t blocksize = 64) {
  const auto w_logical = test::normal(c.out * c.in, 11, 0.2f);
  // stored layout: [out, in], or [in, out] with fan_in_fan_out
  std::vector<float> stored(c.out * c.in);
  for (int64_t o = 0; o < c.out; ++o)
    for (int64_t k = 0; k < c.in; ++k)
      stored[fan_in_fan_out ? k * c.out + o : o * c.in + k] = w_logical[o * c.in + k];
  BaseWeight base;
  base.storage = is_bnb4(storage) ? qtype : storage;
  base.out_features = c.out;
  base.in_features = c.in;
  base.fan_in_fan_out = fan_in_fan_out;
  base.backend = backend;
  std::vector<uint16_t> halves;
  Quantized4 q;
  std::vector<double> w_ref(c.out * c.in);  // what the kernel must see, logical layout
  std::vector<float> stored_seen(stored.size());
  switch (storage) {
    case Format::f32:
      base.data = stored.data();
      stored_seen = stored;
      break;
    case Format::f16:
    case Format::bf16:
      halves.resize(stored.size());
      for (size_t i = 0; i < stored.size(); ++i) {
        halves[i] = storage == Format::f16 ? float_to_f16(stored[i]) : float_to_bf16(stored[i]);
        stored_seen[i] = storage == Format::f16 ? f16_to_float(halves[i]) : bf16_to_float(halves[i]);
      }
      base.data = halves.data();
      break;
    case Format::nf4:
    case Format::fp4:
      q = quantize_4bit(stored.data(), Format::f32, {int64_t(stored.size())}, qtype, blocksize, false,
                        Backend::scalar);
      base.packed = q.packed.data();
      base.absmax = q.absmax.data();
      base.blocksize = blocksize;
      dequantize_4bit(q, stored_seen.data(), Format::f32, Backend::scalar);
      break;
    default:
      FAIL("unexpected storage");
  }
  for (int64_t o = 0; o < c.out; ++o)
    for (int64_t k = 0; k < c.in; ++k)
      w_ref[o * c.in + k] = stored_seen[fan_in_fan_out ? k * c.out + o : o * c.in + k];

  const auto x = test::normal(c.rows * c.in, 12);
  const auto a = test::normal(c.rank * c.in, 13, 0.3f);
  const auto b = test::normal(c.out * c.rank, 14, 0.3f);
  const auto bias = with_bias ? test::normal(c.out, 15) : std::vector<float>{};
  const auto dy = test::normal(c.rows * c.out, 16);
  LoraSpec spec{c.rank, 1.75, p, 1234};
  const Reference ref =
      naive(x, c.rows, w_ref, c.out, c.in, a, b, bias, c.rank, spec.scaling, p, spec.seed, dy);

  std::vector<float> y(c.rows * c.out);
  lora_forward<float>(x.data(), c.rows, base, a.data(), b.data(), with_bias ? bias.data() : nullptr, spec, y.data());
  expect_close(y, ref.y, 2e-5, "y");
  std::vector<float> dx(c.rows * c.in), da(c.rank * c.in), db(c.out * c.rank), dbias(c.out);
  lora_backward<float>(dy.data(), x.data(), c.rows, base, a.data(), b.data(), spec, dx.data(), da.data(), db.data(),
                       with_bias ? dbias.data() : nullptr);
  expect_close(dx, ref.dx, 2e-5, "dx");
  expect_close(da, ref.da, 2e-5, "dA");
  expect_close(db, ref.db, 2e-5, "dB");
  if (with_bias) expect_close(dbias, ref.dbias, 2e-5, "dbias");
}

const std::vector<Case> kCases = {{1, 1, 1, 1},     {3, 31, 33, 2},   {5, 65, 31, 4},    {2, 33, 65, 3},
                                  {7, 130, 600, 5}, {1, 257, 513, 1}, {13, 47, 300, 2},
                                  {4, 70, 40, 3},   {6, 32, 16, 1},   {10, 16, 257, 2},
                                  {300, 40, 70, 2}};  // > 256 rows: the forward's untransposed order

}  // namespace

TEST_CASE("lora kernels match a naive reference for dense bases on every CPU backend", "[lora]") {
  for (Backend backend : available_backends()) {
    if (backend == Backend::cuda) continue;
  for (const Case& c : kCases)
    for (Format storage : {Format::f32, Format::f16, Format::bf16})
      for (bool fan : {false, true})
        for (double p : {0.0, 0.3}) {
          INFO("case " << c.rows << "x" << c.out << "x" << c.in << " r" << c.rank << " storage "
                       << int(storage) << " fan " << fan << " p " << p);
          INFO("backend " << backend_name(backend));
          run_case(c, storage, fan, p, backend, p == 0.0);
        }
  }
}

TEST_CASE("lora kernels match a naive reference for 4-bit bases on every CPU backend", "[lora]") {
  for (Backend backend : available_backends()) {
    if (backend == Backend::cuda) continue;
    for (const Case& c : kCases)
      for (Format qtype : {Format::nf4, Format::fp4})
        for (bool fan : {false, true})
          for (int64_t blocksize : {64, 32, 128}) {
            INFO("backend " << backend_name(backend) << " case " << c.rows << "x" << c.out << "x" << c.in << " r"
                            << c.rank << " fan " << fan << " blocksize " << blocksize);
            run_case(c, qtype, fan, fan ? 0.1 : 0.0, backend, !fan, qtype, blocksize);
          }
  }
}

TEST_CASE("double kernels match the reference tightly", "[lora]") {
  const int64_t rows = 3, out = 33, in = 65, rank = 4;
  const auto wf = test::normal(out * in, 21);
  std::vector<double> w(wf.begin(), wf.end());
  const auto x = test::normal(rows * in, 22), a = test::normal(rank * in, 23), b = test::normal(out * rank, 24);
  const auto dy = test::normal(rows * out, 25);
  std::vector<double> xd(x.begin(), x.end()), ad(a.begin(), a.end()), bd(b.begin(), b.end()), dyd(dy.begin(), dy.end());
  BaseWeight base;
  base.storage = Format::f64;
  base.out_features = out;
  base.in_features = in;
  base.data = w.data();
  LoraSpec spec{rank, 0.5, 0.25, 99};
  const Reference ref = naive(x, rows, w, out, in, a, b, {}, rank, 0.5, 0.25, 99, dy);
  std::vector<double> y(rows * out), dx(rows * in), da(rank * in), db(out * rank);
  lora_forward<double>(xd.data(), rows, base, ad.data(), bd.data(), nullptr, spec, y.data());
  lora_backward<double>(dyd.data(), xd.data(), rows, base, ad.data(), bd.data(), spec, dx.data(), da.data(), db.data(),
                        nullptr);
  expect_close(y, ref.y, 1e-12, "y");
  expect_close(dx, ref.dx, 1e-12, "dx");
  expect_close(da, ref.da, 1e-12, "dA");
  expect_close(db, ref.db, 1e-12, "dB");
}

TEST_CASE("dropout mask is deterministic and has the requested rate", "[lora]") {
  const int64_t n = 200000;
  std::vector<float> m1(n), m2(n), m3(n);
  dropout_mask(7, n, 0.25, m1.data());
  dropout_mask(7, n, 0.25, m2.data());
  dropout_mask(8, n, 0.25, m3.data());
  CHECK(m1 == m2);
  CHECK(m1 != m3);
  int64_t dropped = 0;
  for (float v : m1) {
    dropped += v == 0.0f;
    if (v != 0.0f) CHECK(v == Approx(1.0 / 0.75));
  }
  CHECK(std::abs(double(dropped) / n - 0.25) < 0.01);
  std::vector<float> none(1000);
  dropout_mask(7, 1000, 0.0, none.data());
  for (float v : none) CHECK(v == 1.0f);
}

TEST_CASE("lora kernels reject bad arguments", "[lora]") {
  std::vector<float> w(6), a(3), b(2), x(3), y(2);
  BaseWeight base;
  base.out_features = 2;
  base.in_features = 3;
  base.data = w.data();
  LoraSpec spec{1, 1.0, 0.0, 0};
  CHECK_NOTHROW(lora_forward<float>(x.data(), 1, base, a.data(), b.data(), nullptr, spec, y.data()));
  LoraSpec bad_rank{0, 1.0, 0.0, 0};
  CHECK_THROWS_AS(lora_forward<float>(x.data(), 1, base, a.data(), b.data(), nullptr, bad_rank, y.data()),
                  InvalidArgument);
  LoraSpec bad_dropout{1, 1.0, 1.0, 0};
  CHECK_THROWS_WITH(lora_forward<float>(x.data(), 1, base, a.data(), b.data(), nullptr, bad_dropout, y.data()),
                    Catch::Contains("[lora_forward]") && Catch::Contains("dropout"));
  BaseWeight quant = base;
  quant.storage = Format::nf4;
  CHECK_THROWS_AS(lora_forward<float>(x.data(), 1, quant, a.data(), b.data(), nullptr, spec, y.data()),
                  InvalidArgument);
  CHECK(lora_scaling(16, 4, false) == 4.0);
  CHECK(lora_scaling(16, 4, true) == 8.0);
}

TEST_CASE("a double-quantized Quantized4 works as a base through quant4_base", "[lora]") {
  const int64_t rows = 3, out = 40, in = 96, rank = 2;
  const auto w = test::normal(out * in, 31, 0.1f);
  const Quantized4 q = quantize_4bit(w.data(), Format::f32, {out, in}, Format::nf4, 64, true, Backend::scalar);
  REQUIRE(q.nested.has_value());
  std::vector<float> seen(out * in);
  dequantize_4bit(q, seen.data(), Format::f32, Backend::scalar);
  std::vector<double> w_ref(seen.begin(), seen.end());
  const auto x = test::normal(rows * in, 32), a = test::normal(rank * in, 33), b = test::normal(out * rank, 34);
  const auto dy = test::normal(rows * out, 35);
  std::vector<float> absmax;
  const BaseWeight base = quant4_base(q, false, absmax);
  LoraSpec spec{rank, 2.0, 0.0, 0};
  const Reference ref = naive(x, rows, w_ref, out, in, a, b, {}, rank, 2.0, 0.0, 0, dy);
  std::vector<float> y(rows * out), dx(rows * in);
  lora_forward<float>(x.data(), rows, base, a.data(), b.data(), nullptr, spec, y.data());
  lora_backward<float>(dy.data(), x.data(), rows, base, a.data(), b.data(), spec, dx.data(), nullptr, nullptr,
                       nullptr);
  expect_close(y, ref.y, 2e-5, "y");
  expect_close(dx, ref.dx, 2e-5, "dx");
  Quantized4 flat = q;
  flat.shape = {out * in};
  CHECK_THROWS_WITH(quant4_base(flat, false, absmax), Catch::Contains("[quant4_base]"));
}
