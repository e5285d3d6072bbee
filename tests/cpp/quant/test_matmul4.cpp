// The 4-bit matmul: every backend and every AVX-512 variant (plain, AVX512-BF16,
// AMX) against an independent float64 reference, x @ dequantize_4bit(W, dtype).T
// summed in double, on awkward shapes (K not a multiple of the block, odd K and N,
// blocks that span rows, 1..17 and more rows), float32 / float16 / bfloat16, NF4
// and FP4, NaN and Inf in x; plus argument errors.
//
// Tolerance: |y - ref| <= 2e-5 * sum_k |x_k w_k| + half an ulp of the output dtype
// at |ref| (float32 summation in any order, then one rounding to the output).
#include <bit>
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "halo/backend/dispatch.hpp"
#include "halo/core/convert.hpp"
#include "halo/core/error.hpp"
#include "halo/quant/matmul4.hpp"
#include "halo/quant/quant4.hpp"
#include "src/quant/matmul4_special.hpp"

using namespace halo;

namespace {

// A backend and which AVX-512 extras are switched off (HALO_DISABLE_*).
struct Variant {
  Backend backend;
  bool no_amx;
  bool no_bf16;
  std::string name() const {
    return std::string(backend_name(backend)) + (no_amx ? " -amx" : "") + (no_bf16 ? " -bf16" : "");
  }
};

std::vector<Variant> variants() {
  std::vector<Variant> out;
  for (Backend b : available_backends()) {
    if (b == Backend::cuda) continue;
    out.push_back({b, false, false});
    if (b == Backend::avx512) {
      out.push_back({b, true, false});
      out.push_back({b, true, true});
    }
  }
  return out;
}

struct Environment {
  explicit Environment(const Variant& v) {
    setenv("HALO_DISABLE_AMX", v.no_amx ? "1" : "0", 1);
    setenv("HALO_DISABLE_AVX512_BF16", v.no_bf16 ? "1" : "0", 1);
  }
  ~Environment() {
    unsetenv("HALO_DISABLE_AMX");
    unsetenv("HALO_DISABLE_AVX512_BF16");
  }
};

double ulp_half(Format dtype) { return dtype == Format::bf16 ? std::ldexp(1.0, -8) : dtype == Format::f16 ? std::ldexp(1.0, -11) : 0.0; }

// Values of `dtype` stored as its bits, and the float each one means.
struct Array {
  Format dtype;
  std::vector<float> f32;      // storage when dtype is float32
  std::vector<uint16_t> bits;  // storage otherwise
  std::vector<double> value;   // what each element means
  const void* data() const { return dtype == Format::f32 ? static_cast<const void*>(f32.data()) : bits.data(); }
};

Array make_array(const std::vector<float>& source, Format dtype) {
  Array a{dtype, {}, {}, {}};
  for (float v : source) {
    if (dtype == Format::f32) {
      a.f32.push_back(v);
      a.value.push_back(v);
    } else {
      const uint16_t b = dtype == Format::f16 ? float_to_f16(v) : float_to_bf16(v);
      a.bits.push_back(b);
      a.value.push_back(dtype == Format::f16 ? f16_to_float(b) : bf16_to_float(b));
    }
  }
  return a;
}

double output_value(const std::vector<uint16_t>& bits, const std::vector<float>& f32, Format dtype, int64_t i) {
  if (dtype == Format::f32) return f32[size_t(i)];
  return dtype == Format::f16 ? f16_to_float(bits[size_t(i)]) : bf16_to_float(bits[size_t(i)]);
}

struct Weight {
  Quantized4 q;
  std::vector<float> absmax;  // decoded when nested
  Quant4Matrix view;
};

Weight make_weight(int64_t out, int64_t in, Format type, int64_t blocksize, bool nested, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> values(static_cast<size_t>(out * in));
  for (float& v : values) v = normal(rng);
  Weight w;
  w.q = quantize_4bit(values.data(), Format::f32, {out, in}, type, blocksize, nested);
  w.view = quant4_matrix(w.q, w.absmax);
  return w;
}

// W as the reference sees it: dequantize_4bit (the bit-exact dequantizer) into `dtype`, widened.
std::vector<double> reference_weight(const Weight& w, Format dtype) {
  const int64_t n = w.view.out_features * w.view.in_features;
  std::vector<float> f32(static_cast<size_t>(n));
  std::vector<uint16_t> half(static_cast<size_t>(n));
  void* out = dtype == Format::f32 ? static_cast<void*>(f32.data()) : half.data();
  dequantize_4bit(w.view.packed, w.view.absmax, n, w.view.type, w.view.blocksize, out, dtype, Backend::scalar);
  std::vector<double> d(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) d[size_t(i)] = output_value(half, f32, dtype, i);
  return d;
}

// Checks y (rows x cols) against sum over `depth` of x[r, l] * W(l, c) in double.
void check_product(const Array& x, const std::vector<double>& weight, const Quant4Matrix& w, bool transposed,
                   int64_t rows, const Array* bias, const std::vector<uint16_t>& y_bits,
                   const std::vector<float>& y_f32, const std::string& what) {
  const int64_t out = w.out_features, in = w.in_features;
  const int64_t depth = transposed ? out : in, cols = transposed ? in : out;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      double sum = 0.0, magnitude = 0.0;
      for (int64_t l = 0; l < depth; ++l) {
        const double wv = transposed ? weight[size_t(l * in + c)] : weight[size_t(c * in + l)];
        const double term = x.value[size_t(r * depth + l)] * wv;
        sum += term;
        magnitude += std::fabs(term);
      }
      if (bias != nullptr) {
        sum += bias->value[size_t(c)];
        magnitude += std::fabs(bias->value[size_t(c)]);
      }
      const double got = output_value(y_bits, y_f32, x.dtype, r * cols + c);
      bool ok;
      if (std::isnan(sum))
        ok = std::isnan(got);
      else if (std::isinf(sum))
        ok = got == sum;
      else
        ok = std::fabs(got - sum) <= 2e-5 * magnitude + ulp_half(x.dtype) * std::fabs(sum) + 1e-30;
      if (!ok) FAIL(what << " row " << r << " col " << c << ": got " << got << ", reference " << sum
                         << " (sum of |terms| " << magnitude << ")");
    }
  SUCCEED(what);
}

void run_case(int64_t out, int64_t in, int64_t blocksize, Format type, bool nested, const std::vector<int64_t>& rows_list,
              uint32_t seed) {
  const Weight w = make_weight(out, in, type, blocksize, nested, seed);
  std::mt19937 rng(seed + 1);
  std::normal_distribution<float> normal;
  for (Format dtype : {Format::f32, Format::f16, Format::bf16}) {
    const std::vector<double> weight = reference_weight(w, dtype);
    std::vector<float> bias_source(static_cast<size_t>(out));
    for (float& b : bias_source) b = normal(rng);
    const Array bias = make_array(bias_source, dtype);
    for (bool transposed : {false, true}) {
      const int64_t depth = transposed ? out : in, cols = transposed ? in : out;
      for (int64_t rows : rows_list) {
        std::vector<float> source(static_cast<size_t>(rows * depth));
        for (float& v : source) v = normal(rng);
        const Array x = make_array(source, dtype);
        const bool with_bias = !transposed && rows % 2 == 1;
        for (const Variant& v : variants()) {
          const Environment env(v);
          std::vector<float> y_f32(size_t(rows * cols), -7.0f);
          std::vector<uint16_t> y_bits(size_t(rows * cols), 0x1234);
          void* y = dtype == Format::f32 ? static_cast<void*>(y_f32.data()) : y_bits.data();
          if (transposed)
            matmul_4bit_transposed(x.data(), dtype, rows, w.view, y, v.backend);
          else
            matmul_4bit(x.data(), dtype, rows, w.view, with_bias ? bias.data() : nullptr, y, v.backend);
          const std::string what = std::string(transposed ? "x W" : "x W^T") + " [" + std::to_string(out) + ", " +
                                   std::to_string(in) + "] block " + std::to_string(blocksize) + " " +
                                   std::string(format_name(dtype)) + " rows " + std::to_string(rows) + " on " +
                                   v.name() + " (" +
                                   matmul_4bit_variant(dtype, rows, w.view, transposed, v.backend) + ")";
          check_product(x, weight, w.view, transposed, rows, with_bias ? &bias : nullptr, y_bits, y_f32, what);
        }
      }
    }
  }
}

std::vector<int64_t> one_to(int64_t last) {
  std::vector<int64_t> out;
  for (int64_t r = 1; r <= last; ++r) out.push_back(r);
  return out;
}

}  // namespace

TEST_CASE("matmul_4bit: rows 1..17 and more, decode and panel paths, every backend", "[matmul4]") {
  std::vector<int64_t> rows = one_to(17);
  for (int64_t extra : {24, 33, 40}) rows.push_back(extra);
  run_case(40, 128, 64, Format::nf4, false, rows, 1);   // whole blocks per row: fused GEMV for <= 16 rows
  run_case(37, 576, 128, Format::nf4, true, rows, 2);   // blocks of 128 span rows (576 = 4.5 blocks), nested
}

TEST_CASE("matmul_4bit: awkward shapes (K not a multiple of the block, odd K and N)", "[matmul4]") {
  const std::vector<int64_t> rows = {1, 2, 5, 13, 16, 17, 19};
  run_case(7, 33, 32, Format::nf4, false, rows, 3);      // odd K: rows start mid-byte
  run_case(9, 100, 64, Format::fp4, false, rows, 4);     // K % 64 != 0, FP4
  run_case(16, 64, 32, Format::fp4, true, rows, 5);      // blocks of 32 (two per decode chunk)
  run_case(3, 4160, 4096, Format::nf4, false, rows, 6);  // one huge block spanning rows
  run_case(1, 1, 64, Format::nf4, false, rows, 7);       // a 1 x 1 weight
  run_case(65, 63, 256, Format::nf4, false, rows, 8);
}

TEST_CASE("matmul_4bit: long rows whose x panel outgrows L1 (k in slices, rows of W in blocks)", "[matmul4]") {
  // 2112 = 33 chunks of 64: from 5 rows of x the AVX512-BF16 GEMV goes slice by slice (16 chunks,
  // then 1), W's 21 rows in blocks of 8 (the last 5) and groups of 2 (one left over); 9 and 16
  // rows go in passes of 8; the float32 GEMVs (AVX-512, AVX2) slice from 8 rows (a 66 KiB panel).
  run_case(21, 2112, 64, Format::nf4, true, {1, 3, 4, 5, 8, 9, 16}, 9);
}

TEST_CASE("matmul_4bit: NaN and Inf in x poison exactly the rows that hold them", "[matmul4]") {
  const Weight w = make_weight(19, 128, Format::nf4, 64, false, 11);
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (Format dtype : {Format::f32, Format::f16, Format::bf16}) {
    const std::vector<double> weight = reference_weight(w, dtype);
    for (int64_t rows : {1, 3, 16, 20}) {
      for (bool transposed : {false, true}) {
        const int64_t depth = transposed ? 19 : 128, cols = transposed ? 128 : 19;
        std::mt19937 rng(static_cast<uint32_t>(rows));
        std::normal_distribution<float> normal;
        std::vector<float> source(static_cast<size_t>(rows * depth));
        for (float& v : source) v = normal(rng);
        source[size_t(depth / 3)] = nan;                                   // row 0
        if (rows > 2) source[size_t(2 * depth + 5)] = inf;                 // row 2
        if (rows > 2) source[size_t(2 * depth + 6)] = -inf;                // row 2 again: inf - inf
        if (rows > 15) source[size_t(15 * depth + depth - 1)] = -inf;      // row 15
        const Array x = make_array(source, dtype);
        for (const Variant& v : variants()) {
          const Environment env(v);
          std::vector<float> y_f32(static_cast<size_t>(rows * cols));
          std::vector<uint16_t> y_bits(static_cast<size_t>(rows * cols));
          void* y = dtype == Format::f32 ? static_cast<void*>(y_f32.data()) : y_bits.data();
          if (transposed)
            matmul_4bit_transposed(x.data(), dtype, rows, w.view, y, v.backend);
          else
            matmul_4bit(x.data(), dtype, rows, w.view, nullptr, y, v.backend);
          check_product(x, weight, w.view, transposed, rows, nullptr, y_bits, y_f32,
                        std::string("NaN/Inf ") + std::string(format_name(dtype)) + " on " + v.name() + " (" +
                            matmul_4bit_variant(dtype, rows, w.view, transposed, v.backend) + ")");
        }
      }
    }
  }
}

TEST_CASE("matmul_4bit: NaN and Inf in absmax poison exactly the outputs of their blocks", "[matmul4]") {
  // The GEMV kernels build each block's weight table on a fast path for finite absmax
  // (the AVX2 bfloat16 tables skip the NaN check there): a non-finite block must still
  // give what the dequantized weights give.
  Weight w = make_weight(19, 256, Format::nf4, 64, false, 13);
  std::vector<float> absmax(w.view.absmax, w.view.absmax + 19 * 256 / 64);
  absmax[1] = std::bit_cast<float>(0x7fffffffu);  // row 0: a NaN whose rounding to bfloat16 carries
  absmax[14] = std::numeric_limits<float>::quiet_NaN();  // row 3
  absmax[9] = std::numeric_limits<float>::infinity();   // row 2
  absmax[22] = -std::numeric_limits<float>::infinity();  // row 5
  w.view.absmax = absmax.data();
  for (Format dtype : {Format::f32, Format::f16, Format::bf16}) {
    const std::vector<double> weight = reference_weight(w, dtype);
    for (int64_t rows : {1, 2, 5, 20}) {
      std::mt19937 rng(static_cast<uint32_t>(rows));
      std::normal_distribution<float> normal;
      std::vector<float> source(static_cast<size_t>(rows * 256));
      for (float& v : source) v = normal(rng);
      const Array x = make_array(source, dtype);
      for (const Variant& v : variants()) {
        const Environment env(v);
        std::vector<float> y_f32(static_cast<size_t>(rows * 19));
        std::vector<uint16_t> y_bits(static_cast<size_t>(rows * 19));
        void* y = dtype == Format::f32 ? static_cast<void*>(y_f32.data()) : y_bits.data();
        matmul_4bit(x.data(), dtype, rows, w.view, nullptr, y, v.backend);
        check_product(x, weight, w.view, false, rows, nullptr, y_bits, y_f32,
                      std::string("absmax NaN/Inf ") + std::string(format_name(dtype)) + " on " + v.name() + " (" +
                          matmul_4bit_variant(dtype, rows, w.view, false, v.backend) + ")");
      }
    }
  }
}

TEST_CASE("matmul_4bit: each AVX-512 variant runs where the CPU has it", "[matmul4]") {
  if (!backend_available(Backend::avx512)) return;
  const Weight w = make_weight(64, 256, Format::nf4, 64, false, 12);
  std::set<std::string> seen;
  for (const Variant& v : variants()) {
    const Environment env(v);
    for (int64_t rows : {1, 16, 17, 128})
      for (Format dtype : {Format::f32, Format::bf16})
        for (bool transposed : {false, true})
          seen.insert(matmul_4bit_variant(dtype, rows, w.view, transposed, v.backend));
  }
  const std::string run = [&] {
    std::string s;
    for (const auto& name : seen) s += name + " ";
    return s;
  }();
  INFO("variants run: " << run);
  CHECK(seen.count("avx512") == 1);
  CHECK(seen.count("scalar") == 1);
  // The extras run exactly where the CPU has them: bfloat16 x with 1 row (16 too once AMX is
  // switched off) takes the AVX512-BF16 GEMV; 16 or more rows, or a transposed call, take AMX.
  CHECK(seen.count("avx512-bf16") == (cpu_has(CpuFeature::avx512_bf16) ? 1u : 0u));
  CHECK(seen.count("avx512-amx") == (cpu_has(CpuFeature::amx_bf16) ? 1u : 0u));
}

TEST_CASE("matmul_4bit: bad arguments raise errors naming the function", "[matmul4]") {
  const Weight w = make_weight(8, 64, Format::nf4, 64, false, 13);
  std::vector<float> x(2 * 64, 1.0f), y(2 * 8);
  CHECK_THROWS_AS(matmul_4bit(x.data(), Format::i32, 2, w.view, nullptr, y.data()), TypeMismatch);
  CHECK_THROWS_WITH(matmul_4bit(x.data(), Format::f64, 2, w.view, nullptr, y.data()),
                    Catch::Contains("[matmul_4bit]") && Catch::Contains("float64"));
  CHECK_THROWS_AS(matmul_4bit(x.data(), Format::f32, -1, w.view, nullptr, y.data()), InvalidArgument);
  CHECK_THROWS_AS(matmul_4bit(nullptr, Format::f32, 2, w.view, nullptr, y.data()), InvalidArgument);
  Quant4Matrix bad = w.view;
  bad.blocksize = 48;
  CHECK_THROWS_WITH(matmul_4bit(x.data(), Format::f32, 2, bad, nullptr, y.data()), Catch::Contains("48"));
  bad = w.view;
  bad.type = Format::q4_0;
  CHECK_THROWS_AS(matmul_4bit(x.data(), Format::f32, 2, bad, nullptr, y.data()), InvalidArgument);
  bad = w.view;
  bad.in_features = 0;
  CHECK_THROWS_AS(matmul_4bit(x.data(), Format::f32, 2, bad, nullptr, y.data()), InvalidArgument);
  bad = w.view;
  bad.absmax = nullptr;
  CHECK_THROWS_AS(matmul_4bit(x.data(), Format::f32, 2, bad, nullptr, y.data()), InvalidArgument);
  // y on top of x
  CHECK_THROWS_WITH(matmul_4bit(x.data(), Format::f32, 2, w.view, nullptr, x.data() + 3), Catch::Contains("overlaps"));
  CHECK_THROWS_WITH(matmul_4bit_transposed(x.data(), Format::f32, 2, w.view, x.data() + 1),
                    Catch::Contains("[matmul_4bit_transposed]"));
  // zero rows: nothing to do, y untouched
  y.assign(y.size(), 5.0f);
  matmul_4bit(x.data(), Format::f32, 0, w.view, nullptr, y.data());
  CHECK(y[0] == 5.0f);
  // the registry lists both operations
  bool forward = false, backward = false;
  for (const auto& entry : kernel_inventory()) {
    forward |= entry.op == "matmul_4bit" && entry.backends.size() == 4;
    backward |= entry.op == "matmul_4bit_transposed" && entry.backends.size() == 4;
  }
  CHECK(forward);
  CHECK(backward);
}

TEST_CASE("matmul_4bit on CUDA equals the reference, or says why it cannot run", "[matmul4][cuda]") {
  const Weight w = make_weight(33, 200, Format::nf4, 64, true, 14);
  std::vector<float> x(3 * 200, 0.5f), y(3 * 33);
  if (!backend_available(Backend::cuda)) {
    CHECK_THROWS_AS(matmul_4bit(x.data(), Format::f32, 3, w.view, nullptr, y.data(), Backend::cuda),
                    BackendUnavailable);
    CHECK_THROWS_AS(matmul_4bit_device(x.data(), Format::f32, 3, w.view, nullptr, y.data(), false),
                    BackendUnavailable);
    WARN("CUDA matmul not run: " << backend_unavailable_reason(Backend::cuda));
    return;
  }
  for (Format dtype : {Format::f32, Format::f16, Format::bf16}) {
    const std::vector<double> weight = reference_weight(w, dtype);
    for (int64_t rows : {1, 3, 4, 5, 17}) {
      for (bool transposed : {false, true}) {
        const int64_t depth = transposed ? 33 : 200, cols = transposed ? 200 : 33;
        std::mt19937 rng(static_cast<uint32_t>(rows));
        std::normal_distribution<float> normal;
        std::vector<float> source(static_cast<size_t>(rows * depth));
        for (float& v : source) v = normal(rng);
        const Array xa = make_array(source, dtype);
        std::vector<float> y_f32(static_cast<size_t>(rows * cols));
        std::vector<uint16_t> y_bits(static_cast<size_t>(rows * cols));
        void* out = dtype == Format::f32 ? static_cast<void*>(y_f32.data()) : y_bits.data();
        if (transposed)
          matmul_4bit_transposed(xa.data(), dtype, rows, w.view, out, Backend::cuda);
        else
          matmul_4bit(xa.data(), dtype, rows, w.view, nullptr, out, Backend::cuda);
        check_product(xa, weight, w.view, transposed, rows, nullptr, y_bits, y_f32, "cuda");
      }
    }
  }
}
