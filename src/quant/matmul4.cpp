// The dispatch point for the 4-bit matmul: validates arguments, picks the kernel
// from the registry and organises the work (x conversion, panels, threads, bias,
// output rounding) around the per-ISA pieces of src/quant/matmul4_kernels.hpp.
#include "halo/quant/matmul4.hpp"

#include <algorithm>
#include <bit>
#include <cstring>
#include <vector>

#include "halo/backend/dispatch.hpp"
#include "halo/core/convert.hpp"
#include "halo/core/error.hpp"
#include "halo/core/parallel.hpp"
#include "halo/quant/codebook4.hpp"
#include "src/cuda/cuda_api.hpp"
#include "src/quant/matmul4_buffers.hpp"
#include "src/quant/matmul4_kernels.hpp"
#include "src/quant/matmul4_q8.hpp"
#include "src/quant/matmul4_reference.hpp"
#include "src/quant/matmul4_special.hpp"

namespace halo {
namespace {

using kernels::Matmul4Ops;
using kernels::Matmul4Weight;

// Up to this many rows of x run the fused decode GEMV; more rows dequantize panels
// and run the GEMM (each decoded weight is then reused by every row).
constexpr int64_t kGemvRows = 16;
// GEMM panels: kPanelRows rows of W decoded kPanelDepth deep at a time (48 x 256
// float32 = 48 KiB, in L1/L2 while every row of x passes).
constexpr int64_t kPanelRows = 48;
constexpr int64_t kPanelDepth = 256;
// Transposed product: kStripCols columns of W per panel, kStripDepth rows deep.
constexpr int64_t kStripCols = 128;
constexpr int64_t kStripDepth = 256;
// Rows of W per GEMV task (matmul4_kernels.hpp says how it is chosen).
using kernels::gemv_grain;

struct Job {
  const void* x;
  Format dtype;
  int64_t rows;
  const void* bias;
  void* y;
  Format type;  // nf4 / fp4
  Matmul4Weight w;
};

// x as float32 rows: the caller's memory when it is float32, else a converted copy.
const float* float_rows(const void* data, Format dtype, int64_t count, kernels::AlignedVector<float>& storage) {
  if (dtype == Format::f32) return static_cast<const float*>(data);
  storage.resize(size_t(count));
  parallel_for(count, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) storage[size_t(i)] = load_as_float(data, dtype, i);
  });
  return storage.data();
}

// Where float32 results go before bias and rounding: y itself when it is float32.
float* float_output(const Job& job, int64_t count, kernels::AlignedVector<float>& storage) {
  if (job.dtype == Format::f32) return static_cast<float*>(job.y);
  storage.resize(size_t(count));
  return storage.data();
}

// y = round(y32 + bias) in the caller's dtype (bias added in float32, one rounding).
void finish(const Job& job, const float* y32, int64_t cols, const void* bias) {
  const int64_t count = job.rows * cols;
  if (job.dtype == Format::f32 && bias == nullptr) return;
  parallel_for(count, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float value = y32[i];
      if (bias != nullptr) value += load_as_float(bias, job.dtype, i % cols);
      store_from_float(job.y, job.dtype, i, value);
    }
  });
}

// ---- forward: y = x Wᵀ ---------------------------------------------------------------------------

void forward_scalar(const Job& job) {
  kernels::AlignedVector<float> x_storage, y_storage;
  const float* x32 = float_rows(job.x, job.dtype, job.rows * job.w.in, x_storage);
  float* y32 = float_output(job, job.rows * job.w.out, y_storage);
  parallel_for(job.w.out, 16, [&](int64_t o0, int64_t o1) {
    kernels::matmul4_reference(job.w, x32, job.rows, o0, o1, y32);
  });
  finish(job, y32, job.w.out, job.bias);
}

bool fused_gemv_fits(const Matmul4Ops& ops, const Job& job) {
  return ops.gemv != nullptr && job.rows <= kGemvRows && job.w.in % 64 == 0 && job.w.blocksize >= 64;
}

void forward_gemv(const Matmul4Ops& ops, const Job& job, const float* x32, float* y32) {
  const int64_t in = job.w.in, out = job.w.out;
  kernels::AlignedVector<float> panel;
  for (int64_t r0 = 0; r0 < job.rows; r0 += ops.gemv_max_rows) {
    const int64_t rows = std::min<int64_t>(ops.gemv_max_rows, job.rows - r0);
    panel.resize(size_t(rows * in));
    ops.gemv_pack(x32 + r0 * in, rows, in, panel.data(), job.w.precision);
    parallel_for(out, gemv_grain(out, in),
                 [&](int64_t o0, int64_t o1) { ops.gemv(job.w, panel.data(), rows, o0, o1, y32 + r0 * out, out); });
  }
}

// The GEMM's b operand is read as panels kBPanel columns wide, each stored contiguously
// ([depth][kBPanel]): with a leading dimension of the full width, rows 512 B to 2 KB
// apart fall into a few L1 sets and miss.
constexpr int64_t kBPanel = kernels::kGemmPanel;

// x [rows, in] -> xt[(r / kBPanel) * in * kBPanel + k * kBPanel + r % kBPanel] (xᵀ in panels).
void transpose_rows(const float* x32, int64_t rows, int64_t in, float* xt) {
  constexpr int64_t kTile = 64;
  parallel_for(in, kTile, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kTile)
      for (int64_t r0 = 0; r0 < rows; r0 += kBPanel) {
        const int64_t k1 = std::min(k_end, k0 + kTile), r1 = std::min(rows, r0 + kBPanel);
        float* panel = xt + r0 * in;
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t k = k0; k < k1; ++k) panel[k * kBPanel + (r - r0)] = x32[r * in + k];
      }
  });
}

// yᵀ = W xᵀ panel by panel: W's rows are decoded kPanelDepth deep and broadcast by
// the GEMM against xᵀ; each panel's yᵀ tile is written back transposed.
void forward_gemm(const Matmul4Ops& ops, const Job& job, const float* x32, float* y32) {
  const int64_t in = job.w.in, out = job.w.out, rows = job.rows;
  const int64_t padded = (rows + kBPanel - 1) / kBPanel * kBPanel;
  kernels::AlignedVector<float> xt(size_t(in * padded));
  transpose_rows(x32, rows, in, xt.data());
  parallel_for(out, kPanelRows, [&](int64_t n_begin, int64_t n_end) {
    kernels::AlignedVector<float> panel(size_t(kPanelRows * kPanelDepth)), tile(size_t(kPanelRows * rows));
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanelRows) {
      const int64_t n1 = std::min(n_end, n0 + kPanelRows);
      std::fill(tile.begin(), tile.end(), 0.0f);
      for (int64_t k0 = 0; k0 < in; k0 += kPanelDepth) {
        const int64_t k1 = std::min(in, k0 + kPanelDepth);
        ops.decode(job.w, n0, n1, k0, k1, panel.data(), kPanelDepth);
        ops.gemm_panels(panel.data(), kPanelDepth, xt.data() + k0 * kBPanel, in * kBPanel, tile.data(), rows, n1 - n0,
                        rows, k1 - k0);
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t n = n0; n < n1; ++n) y32[r * out + n] = tile[size_t((n - n0) * rows + r)];
    }
  });
}

void forward_cpu(const Matmul4Ops& ops, const Job& job) {
  kernels::AlignedVector<float> x_storage, y_storage;
  const float* x32 = float_rows(job.x, job.dtype, job.rows * job.w.in, x_storage);
  float* y32 = float_output(job, job.rows * job.w.out, y_storage);
  if (fused_gemv_fits(ops, job))
    forward_gemv(ops, job, x32, y32);
  else
    forward_gemm(ops, job, x32, y32);
  finish(job, y32, job.w.out, job.bias);
}

void forward_avx2(const Job& job) { forward_cpu(kernels::kMatmul4Avx2, job); }
void forward_avx512(const Job& job) { forward_cpu(kernels::kMatmul4Avx512, job); }

// The AVX-512 variants take bfloat16 x of the shapes where they pay and leave the rest to
// the entry below them. `forward_path` is the one place that decides, for the entries and
// for matmul_4bit_variant.
enum class Path { plain, bf16_gemv, amx };

Path forward_path(std::string_view variant, Format dtype, int64_t rows, int64_t in, int64_t blocksize) {
  const bool amx = variant == "avx512-amx" && kernels::amx_forward_fits(dtype, rows);
  if (amx) return Path::amx;
  // Below AMX's rows, the AMX entry runs the AVX512-BF16 GEMV where that variant may run.
  const bool dot = variant == "avx512-bf16" ||
                   (variant == "avx512-amx" && cpu_feature_unavailable_reason(CpuFeature::avx512_bf16).empty());
  return dot && kernels::bf16_gemv_fits(dtype, rows, in, blocksize) ? Path::bf16_gemv : Path::plain;
}

void forward_on(std::string_view variant, const Job& job) {
  switch (forward_path(variant, job.dtype, job.rows, job.w.in, job.w.blocksize)) {
    case Path::amx: return kernels::run_amx_forward(job.x, job.rows, job.w, job.bias, job.y);
    case Path::bf16_gemv: return kernels::run_bf16_gemv(job.x, job.rows, job.w, job.bias, job.y);
    case Path::plain: return forward_avx512(job);
  }
}
void forward_avx512_bf16(const Job& job) { forward_on("avx512-bf16", job); }
void forward_avx512_amx(const Job& job) { forward_on("avx512-amx", job); }

void forward_cuda(const Job& job) {
  cuda::matmul_4bit(job.x, job.dtype, job.rows, job.w.packed, job.w.absmax, job.type, job.w.blocksize, job.w.out,
                    job.w.in, job.bias, job.y, /*transposed=*/false);
}

// ---- int8 activations: y = x Wᵀ with x quantized per 32 elements (matmul4_q8.hpp) -------------

kernels::Q8Weight q8_weight(const Job& job) {
  const kernels::Q8Codebook& book = kernels::q8_codebook(job.type);
  return {job.w.packed, job.w.absmax, book.code, book.inv_scale, job.w.blocksize, job.w.out, job.w.in,
          job.w.block_shift};
}

// The shapes the SIMD entries take (whole 64-element chunks, each within one 4-bit block).
bool q8_simd_fits(int64_t in, int64_t blocksize) { return in % 64 == 0 && blocksize >= 64; }

void forward_int8(const kernels::Matmul4Q8Ops* ops, const Job& job) {
  const int64_t in = job.w.in, out = job.w.out, rows = job.rows, blocks = kernels::q8_subblocks(in);
  kernels::AlignedVector<float> x_storage, y_storage;
  const float* x32 = float_rows(job.x, job.dtype, rows * in, x_storage);
  float* y32 = float_output(job, rows * out, y_storage);
  std::vector<int8_t> q(size_t(rows * in));
  std::vector<float> d(size_t(rows * blocks));
  parallel_for(rows, std::max<int64_t>(1, (int64_t(1) << 16) / in), [&](int64_t r0, int64_t r1) {
    kernels::quantize_q8(x32 + r0 * in, r1 - r0, in, q.data() + r0 * in, d.data() + r0 * blocks);
  });
  const kernels::Q8Weight w = q8_weight(job);
  if (ops != nullptr && q8_simd_fits(in, job.w.blocksize)) {
    kernels::AlignedVector<std::byte> panel;
    for (int64_t r0 = 0; r0 < rows; r0 += ops->max_rows) {
      const int64_t n = std::min<int64_t>(ops->max_rows, rows - r0);
      panel.resize(size_t(n * (in / 64) * kernels::q8_chunk_bytes(ops->lanes)));
      kernels::pack_q8(q.data() + r0 * in, d.data() + r0 * blocks, n, in, ops->lanes, panel.data());
      parallel_for(out, gemv_grain(out, in),
                   [&](int64_t o0, int64_t o1) { ops->gemv(w, panel.data(), n, o0, o1, y32 + r0 * out, out); });
    }
  } else {
    parallel_for(out, 16, [&](int64_t o0, int64_t o1) {
      kernels::matmul4_q8_reference(w, q.data(), d.data(), rows, o0, o1, y32, out);
    });
  }
  finish(job, y32, out, job.bias);
}

void int8_scalar(const Job& job) { forward_int8(nullptr, job); }
void int8_avx2(const Job& job) { forward_int8(&kernels::kMatmul4Q8Avx2, job); }
void int8_avx2_vnni(const Job& job) { forward_int8(&kernels::kMatmul4Q8AvxVnni, job); }
void int8_avx512(const Job& job) { forward_int8(&kernels::kMatmul4Q8Avx512, job); }
void int8_avx512_vnni(const Job& job) { forward_int8(&kernels::kMatmul4Q8Avx512Vnni, job); }

// ---- transposed: y = x W --------------------------------------------------------------------------

void transposed_scalar(const Job& job) {
  kernels::AlignedVector<float> x_storage, y_storage;
  const float* x32 = float_rows(job.x, job.dtype, job.rows * job.w.out, x_storage);
  float* y32 = float_output(job, job.rows * job.w.in, y_storage);
  parallel_for(job.w.in, 16, [&](int64_t k0, int64_t k1) {
    kernels::matmul4_transposed_reference(job.w, x32, job.rows, k0, k1, y32);
  });
  finish(job, y32, job.w.in, nullptr);
}

// y[:, strip] += x[:, o-block] W[o-block, strip]: x rows are broadcast by the GEMM
// against W's decoded rows, which are already laid out as its b operand.
void transposed_cpu(const Matmul4Ops& ops, const Job& job) {
  const int64_t in = job.w.in, out = job.w.out, rows = job.rows;
  kernels::AlignedVector<float> x_storage, y_storage;
  const float* x32 = float_rows(job.x, job.dtype, rows * out, x_storage);
  float* y32 = float_output(job, rows * in, y_storage);
  parallel_for(in, kStripCols, [&](int64_t k_begin, int64_t k_end) {
    // The decoded strip as kBPanel-wide panels, each [kStripDepth][kBPanel] contiguous.
    kernels::AlignedVector<float> panel(size_t(kStripDepth * kStripCols));
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kStripCols) {
      const int64_t k1 = std::min(k_end, k0 + kStripCols);
      for (int64_t r = 0; r < rows; ++r) std::fill(y32 + r * in + k0, y32 + r * in + k1, 0.0f);
      for (int64_t o0 = 0; o0 < out; o0 += kStripDepth) {
        const int64_t o1 = std::min(out, o0 + kStripDepth);
        for (int64_t j0 = k0; j0 < k1; j0 += kBPanel)
          ops.decode(job.w, o0, o1, j0, std::min(k1, j0 + kBPanel), panel.data() + (j0 - k0) * kStripDepth, kBPanel);
        ops.gemm_panels(x32 + o0, out, panel.data(), kStripDepth * kBPanel, y32 + k0, in, rows, k1 - k0, o1 - o0);
      }
    }
  });
  finish(job, y32, in, nullptr);
}

void transposed_avx2(const Job& job) { transposed_cpu(kernels::kMatmul4Avx2, job); }
void transposed_avx512(const Job& job) { transposed_cpu(kernels::kMatmul4Avx512, job); }
void transposed_avx512_amx(const Job& job) {
  if (job.dtype == Format::bf16) return kernels::run_amx_transposed(job.x, job.rows, job.w, job.y);
  transposed_avx512(job);
}

void transposed_cuda(const Job& job) {
  cuda::matmul_4bit(job.x, job.dtype, job.rows, job.w.packed, job.w.absmax, job.type, job.w.blocksize, job.w.out,
                    job.w.in, nullptr, job.y, /*transposed=*/true);
}

// With x, w, bias and y in the current CUDA device's memory, enqueued on `stream`.
void device_cuda(const Job& job, bool transposed, void* stream) {
  cuda::matmul_4bit_device(job.x, job.dtype, job.rows, job.w.packed, job.w.absmax, job.type, job.w.blocksize,
                           job.w.out, job.w.in, job.bias, job.y, transposed, stream);
}

using Matmul4Fn = void (*)(const Job&);
const KernelTable<Matmul4Fn> kMatmul4{
    "matmul_4bit",
    {rung(Backend::scalar, forward_scalar), rung(Backend::avx2, forward_avx2), rung(Backend::avx512, forward_avx512),
     variant("avx512-bf16", Backend::avx512, CpuFeature::avx512_bf16, forward_avx512_bf16),
     variant("avx512-amx", Backend::avx512, CpuFeature::amx_bf16, forward_avx512_amx),
     rung(Backend::cuda, forward_cuda)}};
const KernelTable<Matmul4Fn> kMatmul4T{
    "matmul_4bit_transposed",
    {rung(Backend::scalar, transposed_scalar), rung(Backend::avx2, transposed_avx2),
     rung(Backend::avx512, transposed_avx512),
     variant("avx512-amx", Backend::avx512, CpuFeature::amx_bf16, transposed_avx512_amx),
     rung(Backend::cuda, transposed_cuda)}};
const KernelTable<Matmul4Fn> kMatmul4Int8{
    "matmul_4bit_int8",
    {rung(Backend::scalar, int8_scalar), rung(Backend::avx2, int8_avx2),
     variant("avx2-vnni", Backend::avx2, CpuFeature::avx_vnni, int8_avx2_vnni),
     rung(Backend::avx512, int8_avx512),
     variant("avx512-vnni", Backend::avx512, CpuFeature::avx512_vnni, int8_avx512_vnni)}};
using DeviceFn = void (*)(const Job&, bool, void*);
const KernelTable<DeviceFn> kMatmul4Device{"matmul_4bit_device", {rung(Backend::cuda, device_cuda)}};
const KernelRegistration kRegMatmul4(kMatmul4);
const KernelRegistration kRegMatmul4T(kMatmul4T);
const KernelRegistration kRegMatmul4Device(kMatmul4Device);
const KernelRegistration kRegMatmul4Int8(kMatmul4Int8);

bool overlaps(const void* a, int64_t a_bytes, const void* b, int64_t b_bytes) {
  const auto* pa = static_cast<const char*>(a);
  const auto* pb = static_cast<const char*>(b);
  return a_bytes > 0 && b_bytes > 0 && pa < pb + b_bytes && pb < pa + a_bytes;
}

Job make_job(const char* fn, const void* x, Format dtype, int64_t rows, const Quant4Matrix& w, const void* bias,
             void* y, bool transposed) {
  require<TypeMismatch>(is_kernel_float(dtype), fn, "dtype must be float32, float16 or bfloat16, got ",
                        format_name(dtype));
  check_bnb4(fn, w.type, w.blocksize);
  require(w.out_features > 0 && w.in_features > 0, fn, "weight shape must be positive, got [", w.out_features, ", ",
          w.in_features, "]");
  require(w.out_features <= (int64_t(1) << 40) / w.in_features, fn, "weight shape [", w.out_features, ", ",
          w.in_features, "] is too large");
  require(rows >= 0, fn, "rows must be non-negative, got ", rows);
  require(w.packed != nullptr && w.absmax != nullptr, fn, "the weight's packed codes or absmax are null");
  const int64_t x_cols = transposed ? w.out_features : w.in_features;
  const int64_t y_cols = transposed ? w.in_features : w.out_features;
  require(rows <= (int64_t(1) << 40) / std::max(x_cols, y_cols), fn, "rows = ", rows, " is too large");
  if (rows > 0) require(x != nullptr && y != nullptr, fn, "x or y is null");
  const int64_t size = element_size(dtype);
  require(!overlaps(x, rows * x_cols * size, y, rows * y_cols * size), fn, "y overlaps x");
  if (bias != nullptr) require(!overlaps(bias, y_cols * size, y, rows * y_cols * size), fn, "y overlaps bias");
  const Codebook4& book = codebook4(w.type);
  return Job{x, dtype, rows, bias, y, w.type,
             Matmul4Weight{w.packed, w.absmax, book.code.data(), w.blocksize, w.out_features, w.in_features, dtype,
                           std::countr_zero(uint64_t(w.blocksize))}};
}

}  // namespace

Quant4Matrix quant4_matrix(const Quantized4& tensor, std::vector<float>& absmax_storage) {
  require(tensor.shape.size() == 2, "quant4_matrix", "the weight must be 2-D, got ", tensor.shape.size(),
          " dimensions");
  Quant4Matrix w;
  w.packed = tensor.packed.data();
  w.type = tensor.type;
  w.blocksize = tensor.blocksize;
  w.out_features = tensor.shape[0];
  w.in_features = tensor.shape[1];
  if (tensor.nested) {
    absmax_storage = tensor.block_absmax();
    w.absmax = absmax_storage.data();
  } else {
    w.absmax = tensor.absmax.data();
  }
  return w;
}

Quant4Matrix quant4_matrix(std::string_view fn, const uint8_t* packed, int64_t packed_bytes, const float* absmax,
                           int64_t absmax_count, Format type, int64_t blocksize, int64_t out_features,
                           int64_t in_features) {
  check_bnb4(fn, type, blocksize);
  require(out_features > 0 && in_features > 0, fn, "weight shape must be positive, got [", out_features, ", ",
          in_features, "]");
  require(out_features <= (int64_t(1) << 40) / in_features, fn, "weight shape [", out_features, ", ", in_features,
          "] is too large");
  const int64_t n = out_features * in_features;
  require(packed_bytes == packed_size(n), fn, "packed holds ", packed_bytes, " bytes, expected ", packed_size(n),
          " for a [", out_features, ", ", in_features, "] weight");
  require(absmax_count == num_blocks(n, blocksize), fn, "absmax holds ", absmax_count, " values, expected ",
          num_blocks(n, blocksize));
  return Quant4Matrix{packed, absmax, type, blocksize, out_features, in_features};
}

void check_matmul_4bit_buffers(std::string_view fn, int64_t rows, const Quant4Matrix& w, bool transposed,
                               int64_t x_count, int64_t bias_count, int64_t y_count) {
  require(rows >= 0, fn, "rows must be non-negative, got ", rows);
  const int64_t x_cols = transposed ? w.out_features : w.in_features;
  const int64_t y_cols = transposed ? w.in_features : w.out_features;
  require(rows <= (int64_t(1) << 40) / std::max<int64_t>(1, std::max(x_cols, y_cols)), fn, "rows = ", rows,
          " is too large");
  require(x_count == rows * x_cols, fn, "x holds ", x_count, " elements, expected ", rows, " x ", x_cols);
  if (bias_count >= 0) {
    require(!transposed, fn, "bias is not supported by the transposed product");
    require(bias_count == y_cols, fn, "bias holds ", bias_count, " elements, expected ", y_cols);
  }
  if (y_count >= 0)
    require(y_count == rows * y_cols, fn, "out holds ", y_count, " elements, expected ", rows, " x ", y_cols);
}

Activations parse_activations(std::string_view fn, std::string_view name) {
  if (name == "exact") return Activations::exact;
  if (name == "int8") return Activations::int8;
  fail(fn, "activations must be 'exact' or 'int8', got '", name, "'");
}

void matmul_4bit(const void* x, Format dtype, int64_t rows, const Quant4Matrix& w, const void* bias, void* y,
                 Backend backend, Activations activations) {
  const Job job = make_job("matmul_4bit", x, dtype, rows, w, bias, y, /*transposed=*/false);
  require(activations == Activations::exact || activations == Activations::int8, "matmul_4bit",
          "activations must be exact or int8, got ", int(activations));
  const auto chosen = dispatch(activations == Activations::int8 ? kMatmul4Int8 : kMatmul4, backend);
  if (rows == 0) return;
  chosen.kernel(job);
}

void matmul_4bit_transposed(const void* x, Format dtype, int64_t rows, const Quant4Matrix& w, void* y,
                            Backend backend) {
  const Job job = make_job("matmul_4bit_transposed", x, dtype, rows, w, nullptr, y, /*transposed=*/true);
  const auto chosen = dispatch(kMatmul4T, backend);
  if (rows == 0) return;
  chosen.kernel(job);
}

void matmul_4bit_device(const void* x, Format dtype, int64_t rows, const Quant4Matrix& w, const void* bias, void* y,
                        bool transposed, void* stream) {
  const char* fn = "matmul_4bit_device";
  const Job job = make_job(fn, x, dtype, rows, w, transposed ? nullptr : bias, y, transposed);
  require(!transposed || bias == nullptr, fn, "bias is not supported by the transposed product");
  const auto chosen = dispatch(kMatmul4Device, Backend::cuda);
  if (rows == 0) return;
  chosen.kernel(job, transposed, stream);
}

const char* matmul_4bit_variant(Format dtype, int64_t rows, const Quant4Matrix& w, bool transposed,
                                Backend backend, Activations activations) {
  if (activations == Activations::int8 && !transposed) {
    const std::string_view entry = dispatch(kMatmul4Int8, backend).variant;
    const bool simd = entry != "scalar" && q8_simd_fits(w.in_features, w.blocksize);
    return simd ? entry.data() : "scalar";
  }
  const std::string_view entry = transposed ? dispatch(kMatmul4T, backend).variant : dispatch(kMatmul4, backend).variant;
  if (entry == "avx512-amx" && transposed) return dtype == Format::bf16 ? "avx512-amx" : "avx512";
  if (entry == "avx512-amx" || entry == "avx512-bf16") {
    switch (forward_path(entry, dtype, rows, w.in_features, w.blocksize)) {
      case Path::amx: return "avx512-amx";
      case Path::bf16_gemv: return "avx512-bf16";
      case Path::plain: return "avx512";
    }
  }
  return entry.data();  // the table's variant names are string literals
}

}  // namespace halo
