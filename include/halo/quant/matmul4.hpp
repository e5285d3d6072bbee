// Matrix products with a 4-bit (NF4 / FP4, bitsandbytes layout) weight, computed
// from the packed codes without dequantizing the weight as a whole:
//
//   matmul_4bit:            y = x · Wᵀ (+ bias)    x [rows, in],  y [rows, out]   (a Linear layer's forward)
//   matmul_4bit_transposed: y = x · W              x [rows, out], y [rows, in]    (its input gradient)
//
// W is [out, in] row-major, flattened into bitsandbytes' blocks (a block may span
// rows). x, bias and y share one dtype: float32, float16 or bfloat16. The weight
// is taken at x's precision, exactly as dequantize_4bit(W, dtype of x) gives it
// (code value * absmax, rounded once), and products are summed in float32; the
// sum (plus bias) is rounded once to the output dtype. So the result equals
// x @ dequantize_4bit(W, x.dtype).T up to the float32 summation order.
//
// Kernels (registry ops "matmul_4bit" and "matmul_4bit_transposed"): a scalar
// reference, AVX2 and AVX-512. Few rows (decode) run a fused kernel that decodes
// nibbles in registers and never writes a dequantized tile; many rows (prefill,
// training) dequantize cache-sized panels and run a register-blocked GEMM. On
// CPUs that have them the AVX-512 entry uses AVX512-BF16 dot products and AMX
// tiles for bfloat16 x (chosen at run time; see docs/quantization.md). The CUDA
// entry takes host pointers; halo::cuda::matmul_4bit_device (src/cuda) takes
// device pointers.
//
// Activations::int8 (inference only; matmul_4bit, CPU): x is quantized once per call, per
// row and per 8 consecutive elements, to int8 with a float32 scale (d = max|x| / 127,
// q = nearest-even(x * (1 / d))), W's codes are taken as int8 (round(code * S), S = 127 for
// NF4, 120 for FP4, with absmax / S as the block's scale) and each 8-element piece's
// integer dot product, times d * absmax / S, is summed in float32 (then + bias, one
// rounding to x's dtype), as llama.cpp's Q8 activation blocks do (they take 32 elements
// per scale; 8 costs halo's kernels nothing and about halves x's error, see
// src/quant/matmul4_q8.hpp). Kernels (registry op "matmul_4bit_int8"): a scalar reference,
// AVX2 (vpmaddubsw), AVX-VNNI, AVX-512 (BW) and AVX512-VNNI (vpdpbusd); the SIMD entries
// take in % 64 == 0 and blocksize >= 64 and run the reference otherwise. An 8-element piece
// of x that holds NaN or Inf makes its row NaN. The error against the exact product is
// measured in docs/quantization.md.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "halo/backend/backend.hpp"
#include "halo/core/format.hpp"
#include "halo/quant/quant4.hpp"

namespace halo {

// A non-owning view of a 2-D 4-bit weight [out_features, in_features].
struct Quant4Matrix {
  const uint8_t* packed = nullptr;  // packed_size(out * in) bytes
  const float* absmax = nullptr;    // num_blocks(out * in, blocksize) float32 (nested statistics decoded)
  Format type = Format::nf4;
  int64_t blocksize = 64;
  int64_t out_features = 0;
  int64_t in_features = 0;
};

// A view of a 2-D Quantized4. Nested (double-quantized) absmax is decoded into
// `absmax_storage`, which must outlive the view; plain absmax is used in place.
Quant4Matrix quant4_matrix(const Quantized4& tensor, std::vector<float>& absmax_storage);

// A view of caller memory holding a flat 4-bit weight [out_features, in_features]:
// InvalidArgument naming `function` unless the type, block size and shape are valid and
// packed / absmax hold exactly packed_size(out * in) bytes / num_blocks(out * in) floats.
Quant4Matrix quant4_matrix(std::string_view function, const uint8_t* packed, int64_t packed_bytes,
                           const float* absmax, int64_t absmax_count, Format type, int64_t blocksize,
                           int64_t out_features, int64_t in_features);
// InvalidArgument naming `function` unless x holds rows x (in, or out when transposed)
// elements, bias (when bias_count >= 0; not with transposed) the output width and y
// (when y_count >= 0) rows x the output width.
void check_matmul_4bit_buffers(std::string_view function, int64_t rows, const Quant4Matrix& w, bool transposed,
                               int64_t x_count, int64_t bias_count, int64_t y_count);

// How x enters matmul_4bit: as given (exact) or quantized to int8 per 8 elements (above).
enum class Activations : uint8_t { exact, int8 };
// "exact" or "int8"; InvalidArgument naming `function` and the value otherwise.
Activations parse_activations(std::string_view function, std::string_view name);

// y [rows, out] = x [rows, in] · Wᵀ + bias. `bias` (out values of `dtype`) may be null.
// rows may be 0. y must not overlap x or bias.
void matmul_4bit(const void* x, Format dtype, int64_t rows, const Quant4Matrix& w, const void* bias, void* y,
                 Backend backend = Backend::automatic, Activations activations = Activations::exact);

// y [rows, in] = x [rows, out] · W.
void matmul_4bit_transposed(const void* x, Format dtype, int64_t rows, const Quant4Matrix& w, void* y,
                            Backend backend = Backend::automatic);

// The CUDA kernel with x, w.packed, w.absmax, bias and y all in the current CUDA
// device's memory, enqueued on `stream` (a cudaStream_t; nullptr = the default
// stream) without synchronizing. BackendUnavailable in a build without CUDA.
void matmul_4bit_device(const void* x, Format dtype, int64_t rows, const Quant4Matrix& w, const void* bias, void* y,
                        bool transposed, void* stream = nullptr);

// Which kernel family a call with these arguments runs on this machine ("scalar",
// "avx2", "avx512", "avx512-bf16", "avx512-amx", "cuda"; with int8 activations "scalar",
// "avx2", "avx2-vnni", "avx512", "avx512-vnni"): for benchmarks and tests.
const char* matmul_4bit_variant(Format dtype, int64_t rows, const Quant4Matrix& w, bool transposed,
                                Backend backend = Backend::automatic, Activations activations = Activations::exact);

}  // namespace halo
