// Every entry of every kernel table that this machine can run, against the table's
// scalar entry, through the public function that dispatches it (ScopedKernelChoice pins
// the entry), on awkward sizes (odd lengths, partial blocks, rows that do not fill a
// register tile). Integer outputs (codes, bytes, optimizer states) must be equal; float
// products within the summation-order tolerance stated per runner.
//
// Every table in halo.kernels() must have a runner here: a new table without one fails
// "every registered table has a runner", so adding an entry means adding its check.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "halo/backend/dispatch.hpp"
#include "halo/core/convert.hpp"
#include "halo/edge/group_store.hpp"
#include "halo/gguf/convert.hpp"
#include "halo/hwq/quantizer.hpp"
#include "halo/lora/linear.hpp"
#include "halo/optim/adamw8bit.hpp"
#include "halo/quant/matmul4.hpp"
#include "halo/quant/quant4.hpp"
#include "tests/cpp/random.hpp"

using namespace halo;

namespace {

using halo::test::normal;

// What a runner produced: exact bytes, and floats with a per-element tolerance.
struct Result {
  std::vector<uint8_t> bytes;
  std::vector<double> values;
  std::vector<double> tolerance;  // beside values
  void add_bytes(const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    bytes.insert(bytes.end(), p, p + n);
  }
  void add_value(double v, double tol) {
    values.push_back(v);
    tolerance.push_back(tol);
  }
};

// Values of `dtype` as 16-bit patterns or float32, from float32 sources.
std::vector<uint16_t> to_half(const std::vector<float>& v, Format dtype) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = dtype == Format::f16 ? float_to_f16(v[i]) : float_to_bf16(v[i]);
  return out;
}
double half_value(uint16_t bits, Format dtype) { return dtype == Format::f16 ? f16_to_float(bits) : bf16_to_float(bits); }

Result run_quantize_4bit() {
  Result r;
  for (Format dtype : {Format::f32, Format::f16, Format::bf16})
    for (Format type : {Format::nf4, Format::fp4})
      for (int64_t n : {int64_t(1), int64_t(63), int64_t(1000 + 7), int64_t(4096 * 3 + 65)}) {
        const std::vector<float> x = normal(n, uint32_t(n));
        const std::vector<uint16_t> h = dtype == Format::f32 ? std::vector<uint16_t>() : to_half(x, dtype);
        std::vector<uint8_t> packed(size_t(packed_size(n)));
        std::vector<float> absmax(size_t(num_blocks(n, 64)));
        quantize_4bit(dtype == Format::f32 ? static_cast<const void*>(x.data()) : h.data(), dtype, n, type, 64,
                      packed.data(), absmax.data());
        r.add_bytes(packed.data(), packed.size());
        r.add_bytes(absmax.data(), absmax.size() * 4);
      }
  return r;
}

struct Weight4 {
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  int64_t n;
};
Weight4 weight4(int64_t n, Format type, int64_t blocksize, uint32_t seed) {
  const std::vector<float> x = normal(n, seed);
  Weight4 w{std::vector<uint8_t>(size_t(packed_size(n))), std::vector<float>(size_t(num_blocks(n, blocksize))), n};
  quantize_4bit(x.data(), Format::f32, n, type, blocksize, w.packed.data(), w.absmax.data(), Backend::scalar);
  return w;
}

Result run_dequantize_4bit() {
  Result r;
  for (Format dtype : {Format::f32, Format::f16, Format::bf16})
    for (int64_t n : {int64_t(1), int64_t(77), int64_t(4096 + 33)}) {
      const Weight4 w = weight4(n, Format::nf4, 32, uint32_t(n));
      std::vector<uint8_t> out(size_t(n * element_size(dtype)));
      dequantize_4bit(w.packed.data(), w.absmax.data(), n, Format::nf4, 32, out.data(), dtype);
      r.add_bytes(out.data(), out.size());
    }
  return r;
}

Result run_dequantize_4bit_range() {
  Result r;
  const Weight4 w = weight4(1000, Format::fp4, 64, 5);
  for (auto [begin, end] : {std::pair<int64_t, int64_t>{0, 1000}, {3, 130}, {63, 64}, {129, 999}}) {
    std::vector<float> out(size_t(end - begin));
    dequantize_4bit_range(w.packed.data(), w.absmax.data(), Format::fp4, 64, begin, end, out.data(),
                          Backend::automatic);
    r.add_bytes(out.data(), out.size() * 4);
  }
  return r;
}

// Products summed in float32 in any order: |y - y_scalar| <= 4e-5 * sum |x w| + one output ulp.
void add_product(Result& r, const std::vector<uint8_t>& y, Format dtype, const std::vector<double>& magnitude) {
  for (size_t i = 0; i < magnitude.size(); ++i) {
    double v;
    double ulp = 0.0;
    if (dtype == Format::f32) {
      float f;
      std::memcpy(&f, y.data() + 4 * i, 4);
      v = f;
    } else {
      uint16_t bits;
      std::memcpy(&bits, y.data() + 2 * i, 2);
      v = half_value(bits, dtype);
      ulp = std::ldexp(std::fabs(v) + 1e-30, dtype == Format::bf16 ? -7 : -10);
    }
    r.add_value(v, 4e-5 * magnitude[i] + ulp);
  }
}

Result run_matmul(bool transposed) {
  Result r;
  for (Format dtype : {Format::f32, Format::bf16, Format::f16})
    for (auto [out, in, blocksize] : {std::tuple<int64_t, int64_t, int64_t>{37, 128, 64}, {19, 100, 32}, {64, 320, 128}})
      for (int64_t rows : {1, 3, 5, 16, 17, 33}) {
        const Weight4 w = weight4(out * in, Format::nf4, blocksize, uint32_t(out + in));
        const Quant4Matrix m{w.packed.data(), w.absmax.data(), Format::nf4, blocksize, out, in};
        const int64_t x_cols = transposed ? out : in, y_cols = transposed ? in : out;
        const std::vector<float> x32 = normal(rows * x_cols, uint32_t(rows));
        const std::vector<uint16_t> x16 = dtype == Format::f32 ? std::vector<uint16_t>() : to_half(x32, dtype);
        const void* x = dtype == Format::f32 ? static_cast<const void*>(x32.data()) : x16.data();
        std::vector<uint8_t> y(size_t(rows * y_cols * element_size(dtype)));
        if (transposed)
          matmul_4bit_transposed(x, dtype, rows, m, y.data());
        else
          matmul_4bit(x, dtype, rows, m, nullptr, y.data());
        // sum |x w| per output element, with W as float32 (close enough for a tolerance).
        std::vector<float> wf(size_t(out * in));
        dequantize_4bit(w.packed.data(), w.absmax.data(), out * in, Format::nf4, blocksize, wf.data(), Format::f32,
                        Backend::scalar);
        std::vector<double> magnitude(size_t(rows * y_cols), 0.0);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < y_cols; ++j)
            for (int64_t k = 0; k < x_cols; ++k) {
              const double wv = transposed ? wf[size_t(k * in + j)] : wf[size_t(j * in + k)];
              magnitude[size_t(i * y_cols + j)] += std::fabs(x32[size_t(i * x_cols + k)] * wv);
            }
        add_product(r, y, dtype, magnitude);
      }
  return r;
}

// int8 activations (matmul4.hpp): the same int8 sums in every entry, so float32 summation
// order is all that differs: |y - y_scalar| <= 1e-5 * sum |x w| + one output ulp.
Result run_matmul_int8() {
  Result r;
  for (Format dtype : {Format::f32, Format::bf16})
    for (auto [out, in, blocksize] :
         {std::tuple<int64_t, int64_t, int64_t>{37, 128, 64}, {19, 100, 32}, {9, 576, 256}})
      for (int64_t rows : {1, 3, 8, 9, 17}) {
        const Weight4 w = weight4(out * in, Format::fp4, blocksize, uint32_t(out + in));
        const Quant4Matrix m{w.packed.data(), w.absmax.data(), Format::fp4, blocksize, out, in};
        const std::vector<float> x32 = normal(rows * in, uint32_t(rows));
        const std::vector<uint16_t> x16 = dtype == Format::f32 ? std::vector<uint16_t>() : to_half(x32, dtype);
        const void* x = dtype == Format::f32 ? static_cast<const void*>(x32.data()) : x16.data();
        std::vector<uint8_t> y(size_t(rows * out * element_size(dtype)));
        matmul_4bit(x, dtype, rows, m, nullptr, y.data(), Backend::automatic, Activations::int8);
        std::vector<float> wf(size_t(out * in));
        dequantize_4bit(w.packed.data(), w.absmax.data(), out * in, Format::fp4, blocksize, wf.data(), Format::f32,
                        Backend::scalar);
        std::vector<double> magnitude(size_t(rows * out), 0.0);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < out; ++j)
            for (int64_t k = 0; k < in; ++k)
              magnitude[size_t(i * out + j)] += std::fabs(x32[size_t(i * in + k)] * wf[size_t(j * in + k)]);
        add_product(r, y, dtype, magnitude);
      }
  return r;
}

Result run_gguf_quantize(std::string_view op) {
  const std::string name(op.substr(std::string_view("gguf.quantize_").size()));
  const gguf::GgmlType type = gguf::parse_type(name);
  const int64_t block = gguf::type_layout(uint32_t(type))->block;
  Result r;
  for (int64_t blocks : {1, 3, 17}) {
    const int64_t n = blocks * std::max<int64_t>(block, 256);
    std::vector<float> x = normal(n, uint32_t(blocks), 3.0f);
    x[0] = 0.0f;
    std::vector<uint8_t> out(size_t(gguf::type_bytes(type, n)));
    gguf::quantize_rows(type, x.data(), out.data(), n);
    r.add_bytes(out.data(), out.size());
  }
  return r;
}

Result run_edge_dot() {
  Result r;
  const int64_t rows = 3, in = 130, out = 7;
  const Weight4 w = weight4(out * in, Format::nf4, 64, 9);
  const std::vector<float> x = normal(rows * in, 10);
  std::vector<float> y(size_t(rows * out));
  edge::linear_4bit(x.data(), rows, in, w.packed.data(), w.absmax.data(), Format::nf4, 64, out, y.data());
  for (float v : y) r.add_value(v, 1e-4 * (1.0 + std::fabs(v)));
  return r;
}

Result run_lora_tile_gemm() {
  Result r;
  const int64_t rows = 5, in = 70, out = 33, rank = 3;
  std::vector<float> absmax_storage;
  const std::vector<float> wv = normal(out * in, 11);
  const Quantized4 q = quantize_4bit(wv.data(), Format::f32, {out, in}, Format::nf4, 64);
  const lora::BaseWeight base = lora::quant4_base(q, false, absmax_storage);
  const std::vector<float> x = normal(rows * in, 12), a = normal(rank * in, 13, 0.1f), b = normal(out * rank, 14, 0.1f);
  lora::LoraSpec spec;
  spec.rank = rank;
  spec.scaling = 2.0;
  std::vector<float> y(size_t(rows * out));
  lora::lora_forward<float>(x.data(), rows, base, a.data(), b.data(), nullptr, spec, y.data());
  for (float v : y) r.add_value(v, 1e-4 * (1.0 + std::fabs(v)));
  return r;
}

Result run_segment_error() {
  Result r;
  const std::vector<float> book = {-8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 7};
  for (int64_t count : {1, 7, 33, 250}) {
    const std::vector<float> x = normal(count, uint32_t(count));
    std::vector<float> s = normal(count, uint32_t(count + 1));
    for (float& v : s) v = std::fabs(v) + 0.1f;
    const hwq::ScaleFit fit = hwq::fit_scale(x.data(), s.data(), count, book);
    // A near-tie between candidate scales may resolve differently (quantizer.hpp): the error is compared.
    r.add_value(fit.error, 1e-4 * (1e-6 + std::fabs(fit.error)));
  }
  return r;
}

Result run_adamw8bit() {
  Result r;
  for (int64_t n : {1, 255, 257, 4096 + 33}) {
    std::vector<float> param = normal(n, uint32_t(n)), grad = normal(n, uint32_t(n + 1), 1e-3f);
    std::vector<uint8_t> s1(static_cast<size_t>(n)), s2(static_cast<size_t>(n));
    const int64_t blocks = (n + kOptimizerBlocksize - 1) / kOptimizerBlocksize;
    std::vector<float> a1(static_cast<size_t>(blocks)), a2(static_cast<size_t>(blocks));
    AdamW8bitSettings settings;
    for (int64_t t = 1; t <= 3; ++t) {
      settings.step = t;
      adamw8bit_step(param.data(), grad.data(), Format::f32, n, s1.data(), s2.data(), a1.data(), a2.data(), settings);
    }
    r.add_bytes(param.data(), param.size() * 4);
    r.add_bytes(s1.data(), s1.size());
    r.add_bytes(s2.data(), s2.size());
  }
  return r;
}

using Runner = std::function<Result(std::string_view op)>;

// op -> runner. Tables whose entries all take device pointers are only run with a CUDA
// device (none of their entries is available otherwise, which the test checks).
const std::map<std::string, Runner>& runners() {
  static const std::map<std::string, Runner> table = {
      {"quantize_4bit", [](std::string_view) { return run_quantize_4bit(); }},
      {"dequantize_4bit", [](std::string_view) { return run_dequantize_4bit(); }},
      {"dequantize_4bit_range", [](std::string_view) { return run_dequantize_4bit_range(); }},
      {"matmul_4bit", [](std::string_view) { return run_matmul(false); }},
      {"matmul_4bit_transposed", [](std::string_view) { return run_matmul(true); }},
      {"matmul_4bit_int8", [](std::string_view) { return run_matmul_int8(); }},
      {"edge_linear4_dot", [](std::string_view) { return run_edge_dot(); }},
      {"lora_tile_gemm", [](std::string_view) { return run_lora_tile_gemm(); }},
      {"hwq_segment_error", [](std::string_view) { return run_segment_error(); }},
      {"adamw8bit_step", [](std::string_view) { return run_adamw8bit(); }},
  };
  return table;
}

bool device_only(const KernelInventoryEntry& e) {
  return std::all_of(e.variants.begin(), e.variants.end(), [](const auto& v) { return v.backend == Backend::cuda; });
}

const Runner* runner_for(const std::string& op) {
  static const Runner gguf = run_gguf_quantize;
  if (op.rfind("gguf.quantize_", 0) == 0) return &gguf;
  const auto it = runners().find(op);
  return it == runners().end() ? nullptr : &it->second;
}

}  // namespace

TEST_CASE("every registered table has a runner (or only device-pointer entries)", "[dispatch][variants]") {
  (void)run_adamw8bit;  // the runners' calls link every area's tables into this test
  const auto inventory = kernel_inventory();
  REQUIRE(inventory.size() >= 20);
  for (const KernelInventoryEntry& e : inventory) {
    INFO("table " << e.op);
    CHECK((runner_for(e.op) != nullptr || device_only(e)));
    CHECK(!e.variants.empty());
  }
}

TEST_CASE("every available entry of every table equals its scalar entry on awkward sizes", "[dispatch][variants]") {
  int run = 0;
  for (const KernelInventoryEntry& e : kernel_inventory()) {
    const Runner* runner = runner_for(e.op);
    if (runner == nullptr) {  // device-pointer tables
      for (const KernelVariantInfo& v : e.variants)
        if (!e.unavailable_reason(v).empty()) CHECK(e.unavailable_reason(v).find("CUDA") != std::string::npos);
      continue;
    }
    Result reference;
    {
      const ScopedKernelChoice pin(e.op, "scalar");
      reference = (*runner)(e.op);
    }
    REQUIRE((!reference.bytes.empty() || !reference.values.empty()));
    for (const KernelVariantInfo& v : e.variants) {
      if (v.variant == "scalar") continue;
      const std::string why = e.unavailable_reason(v);
      if (!why.empty()) {
        // Not runnable here: asking for it exactly is a clear error naming the op and the variant.
        const ScopedKernelChoice pin(e.op, v.variant);
        CHECK_THROWS_AS((*runner)(e.op), BackendUnavailable);
        CHECK_THROWS_WITH((*runner)(e.op), Catch::Contains(e.op) && Catch::Contains(v.variant));
        continue;
      }
      Result got;
      {
        const ScopedKernelChoice pin(e.op, v.variant);
        got = (*runner)(e.op);
      }
      ++run;
      INFO("table " << e.op << ", entry " << v.variant);
      CHECK(got.bytes == reference.bytes);
      REQUIRE(got.values.size() == reference.values.size());
      int64_t bad = 0, first = -1;
      for (size_t i = 0; i < got.values.size(); ++i) {
        const bool same = std::isnan(got.values[i]) ? std::isnan(reference.values[i])
                                                    : std::fabs(got.values[i] - reference.values[i]) <=
                                                          reference.tolerance[i];
        if (!same && bad++ == 0) first = int64_t(i);
      }
      INFO("first mismatch at " << first << ": " << (first >= 0 ? got.values[size_t(first)] : 0.0) << " vs "
                                << (first >= 0 ? reference.values[size_t(first)] : 0.0));
      CHECK(bad == 0);
    }
  }
  INFO("entries run beside scalar: " << run);
  CHECK(run > 0);
}

TEST_CASE("an explicit variant gets exactly that entry, automatic the best available", "[dispatch][variants]") {
  using Fn = int (*)();
  static constexpr Fn one = [] { return 1; }, two = [] { return 2; }, three = [] { return 3; }, four = [] { return 4; };
  const KernelTable<Fn> table{"test_variants",
                              {rung(Backend::scalar, one), rung(Backend::avx512, two),
                               variant("avx512-bf16", Backend::avx512, CpuFeature::avx512_bf16, three),
                               variant("avx512-amx", Backend::avx512, CpuFeature::amx_bf16, four)}};
  CHECK(dispatch(table, "scalar").kernel() == 1);
  CHECK_THROWS_WITH(dispatch(table, "avx2"), Catch::Contains("[test_variants]") && Catch::Contains("avx2") &&
                                                 Catch::Contains("scalar, avx512, avx512-bf16, avx512-amx"));
  unsetenv("HALO_BACKEND");
  const auto best = dispatch(table, Backend::automatic);
  if (cpu_has(CpuFeature::amx_bf16)) {
    CHECK(best.variant == "avx512-amx");
    setenv("HALO_DISABLE_AMX", "1", 1);
    CHECK(dispatch(table, Backend::automatic).variant == "avx512-bf16");
    CHECK_THROWS_WITH(dispatch(table, "avx512-amx"), Catch::Contains("HALO_DISABLE_AMX"));
    unsetenv("HALO_DISABLE_AMX");
  } else if (cpu_has(CpuFeature::avx512_bf16)) {
    CHECK(best.variant == "avx512-bf16");
  } else if (backend_available(Backend::avx512)) {
    CHECK(best.variant == "avx512");
  } else {
    CHECK(best.variant == "scalar");  // no avx2 entry: automatic steps down to scalar
  }
  if (!cpu_has(CpuFeature::amx_bf16))
    CHECK_THROWS_AS(dispatch(table, "avx512-amx"), BackendUnavailable);
  {
    const ScopedKernelChoice pin("test_variants", "scalar");
    CHECK(dispatch(table, Backend::automatic).kernel() == 1);
    CHECK(dispatch(table, Backend::scalar).kernel() == 1);  // an explicit backend is not overridden
  }
  CHECK(dispatch(table, Backend::automatic).variant == best.variant);
}
