// The dispatch point for the 4-bit kernels: validates arguments, resolves the
// backend and splits the work across threads in whole blocks.
#include "halo/quant/quant4.hpp"

#include <algorithm>

#include "halo/core/error.hpp"
#include "halo/core/parallel.hpp"
#include "halo/quant/block.hpp"
#include "src/cuda/cuda_api.hpp"
#include "src/quant/quant4_kernels.hpp"

namespace halo {
namespace {

// About 256 KiB of float input per chunk: big enough to amortize a thread.
constexpr int64_t kElementsPerChunk = 1 << 16;

void check_common(const char* function, int64_t n, int64_t blocksize) {
  require(n > 0, function, "the tensor is empty (n = ", n, ")");
  require(valid_blocksize(blocksize), function, "blocksize must be a power of two in 32..4096, got ", blocksize);
}

using QuantizeKernel = void (*)(const kernels::Quant4Job&, int64_t, int64_t);
using DequantizeKernel = void (*)(const kernels::Dequant4Job&, int64_t, int64_t, void*);

QuantizeKernel quantize_kernel(Backend backend) {
  switch (backend) {
    case Backend::avx512: return kernels::quantize4_avx512;
    case Backend::avx2: return kernels::quantize4_avx2;
    default: return kernels::quantize4_scalar;
  }
}

DequantizeKernel dequantize_kernel(Backend backend) {
  switch (backend) {
    case Backend::avx512: return kernels::dequantize4_avx512;
    case Backend::avx2: return kernels::dequantize4_avx2;
    default: return kernels::dequantize4_scalar;
  }
}

}  // namespace

void quantize_4bit(const void* input, DType dtype, int64_t n, QuantType type, int64_t blocksize, uint8_t* packed,
                   float* absmax, Backend backend) {
  check_common("quantize_4bit", n, blocksize);
  backend = resolve(backend);
  if (backend == Backend::cuda) {
    cuda::quantize_4bit(input, dtype, n, int(type), blocksize, packed, absmax);
    return;
  }
  const kernels::Quant4Job job{input, dtype, n, blocksize, &format4(type), packed, absmax};
  const QuantizeKernel kernel = quantize_kernel(backend);
  const int64_t blocks_per_chunk = std::max<int64_t>(1, kElementsPerChunk / blocksize);
  parallel_for(num_blocks(n, blocksize), blocks_per_chunk,
               [&](int64_t first, int64_t last) { kernel(job, first, last); });
}

void dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n, QuantType type, int64_t blocksize,
                     void* output, DType dtype, Backend backend) {
  check_common("dequantize_4bit", n, blocksize);
  backend = resolve(backend);
  if (backend == Backend::cuda) {
    cuda::dequantize_4bit(packed, absmax, n, int(type), blocksize, output, dtype);
    return;
  }
  const kernels::Dequant4Job job{packed, absmax, blocksize, &format4(type), dtype};
  const DequantizeKernel kernel = dequantize_kernel(backend);
  const int64_t element_size = dtype_size(dtype);
  parallel_for(n, kElementsPerChunk * 4, [&](int64_t begin, int64_t end) {
    kernel(job, begin, end, static_cast<char*>(output) + begin * element_size);
  });
}

void dequantize_4bit_range(const uint8_t* packed, const float* absmax, QuantType type, int64_t blocksize,
                           int64_t begin, int64_t end, float* output, Backend backend) {
  require(valid_blocksize(blocksize), "dequantize_4bit_range", "blocksize must be a power of two in 32..4096, got ",
          blocksize);
  require(0 <= begin && begin <= end, "dequantize_4bit_range", "bad range [", begin, ", ", end, ")");
  backend = resolve(backend);
  require(backend != Backend::cuda, "dequantize_4bit_range", "works on host memory; backend 'cuda' is not accepted");
  const kernels::Dequant4Job job{packed, absmax, blocksize, &format4(type), DType::f32};
  dequantize_kernel(backend)(job, begin, end, output);
}

int64_t Quantized4::numel() const {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  return count;
}

std::vector<float> Quantized4::block_absmax() const {
  if (!nested) return absmax;
  std::vector<float> out(nested->codes.size());
  double_dequantize(*nested, out.data());
  return out;
}

Quantized4 quantize_4bit(const void* input, DType dtype, const std::vector<int64_t>& shape, QuantType type,
                         int64_t blocksize, bool double_quant, Backend backend) {
  Quantized4 out;
  out.type = type;
  out.blocksize = blocksize;
  out.shape = shape;
  out.dtype = dtype;
  for (int64_t d : shape) require(d >= 0, "quantize_4bit", "negative dimension ", d);
  const int64_t n = out.numel();
  check_common("quantize_4bit", n, blocksize);
  out.packed.resize(packed_size(n));
  out.absmax.resize(num_blocks(n, blocksize));
  quantize_4bit(input, dtype, n, type, blocksize, out.packed.data(), out.absmax.data(), backend);
  if (double_quant) {
    out.nested = double_quantize(out.absmax.data(), int64_t(out.absmax.size()));
    out.absmax.clear();
  }
  return out;
}

void dequantize_4bit(const Quantized4& tensor, void* output, DType dtype, Backend backend) {
  const std::vector<float> absmax = tensor.block_absmax();
  dequantize_4bit(tensor.packed.data(), absmax.data(), tensor.numel(), tensor.type, tensor.blocksize, output, dtype,
                  backend);
}

}  // namespace halo
