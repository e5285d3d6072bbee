// The dispatch point for the 4-bit kernels: validates arguments, picks the
// kernel from the registry and splits the work across threads in whole blocks.
#include "halo/quant/quant4.hpp"

#include <algorithm>

#include "halo/backend/dispatch.hpp"
#include "halo/core/error.hpp"
#include "halo/core/parallel.hpp"
#include "halo/quant/block.hpp"
#include "src/cuda/cuda_api.hpp"
#include "src/quant/quant4_kernels.hpp"

namespace halo {
namespace {

// About 256 KiB of float input per chunk: big enough to amortize a thread.
constexpr int64_t kElementsPerChunk = 1 << 16;

void check_common(std::string_view function, int64_t n, Format type, int64_t blocksize) {
  require(n > 0, function, "the tensor is empty (n = ", n, ")");
  check_bnb4(function, type, blocksize);
}

void check_input(const char* function, Format dtype) {
  require<TypeMismatch>(is_kernel_float(dtype), function, "dtype must be float32, float16 or bfloat16, got ",
                        format_name(dtype));
}

// Whole-operation signatures: CPU entries split the work over the thread pool,
// the CUDA entry hands the whole tensor to the device.
using QuantizeOp = void (*)(const void*, Format, int64_t, Format, int64_t, uint8_t*, float*);
using DequantizeOp = void (*)(const uint8_t*, const float*, int64_t, Format, int64_t, void*, Format);

template <void (*Kernel)(const kernels::Quant4Job&, int64_t, int64_t)>
void quantize_on_cpu(const void* input, Format dtype, int64_t n, Format type, int64_t blocksize, uint8_t* packed,
                     float* absmax) {
  const kernels::Quant4Job job{input, dtype, n, blocksize, &codebook4(type), packed, absmax};
  const int64_t blocks_per_chunk = std::max<int64_t>(1, kElementsPerChunk / blocksize);
  parallel_for(num_blocks(n, blocksize), blocks_per_chunk,
               [&](int64_t first, int64_t last) { Kernel(job, first, last); });
}

template <void (*Kernel)(const kernels::Dequant4Job&, int64_t, int64_t, void*)>
void dequantize_on_cpu(const uint8_t* packed, const float* absmax, int64_t n, Format type, int64_t blocksize,
                       void* output, Format dtype) {
  const kernels::Dequant4Job job{packed, absmax, blocksize, &codebook4(type), dtype};
  const int64_t element_bytes = element_size(dtype);
  parallel_for(n, kElementsPerChunk * 4, [&](int64_t begin, int64_t end) {
    Kernel(job, begin, end, static_cast<char*>(output) + begin * element_bytes);
  });
}

const KernelTable<QuantizeOp> kQuantize4{"quantize_4bit",
                                         {rung(Backend::scalar, quantize_on_cpu<kernels::quantize4_scalar>),
                                          rung(Backend::avx2, quantize_on_cpu<kernels::quantize4_avx2>),
                                          rung(Backend::avx512, quantize_on_cpu<kernels::quantize4_avx512>),
                                          rung(Backend::cuda, cuda::quantize_4bit)}};
const KernelTable<DequantizeOp> kDequantize4{"dequantize_4bit",
                                             {rung(Backend::scalar, dequantize_on_cpu<kernels::dequantize4_scalar>),
                                              rung(Backend::avx2, dequantize_on_cpu<kernels::dequantize4_avx2>),
                                              rung(Backend::avx512, dequantize_on_cpu<kernels::dequantize4_avx512>),
                                              rung(Backend::cuda, cuda::dequantize_4bit)}};

using RangeKernel = void (*)(const kernels::Dequant4Job&, int64_t, int64_t, void*);
const KernelTable<RangeKernel> kDequantize4Range{"dequantize_4bit_range",
                                                 {rung(Backend::scalar, kernels::dequantize4_scalar),
                                                  rung(Backend::avx2, kernels::dequantize4_avx2),
                                                  rung(Backend::avx512, kernels::dequantize4_avx512)}};

// Device pointers in and out (torch CUDA tensors), queued on the caller's stream.
using QuantizeDeviceOp = void (*)(const void*, Format, int64_t, Format, int64_t, uint8_t*, float*, uintptr_t);
using DequantizeDeviceOp = void (*)(const uint8_t*, const float*, int64_t, Format, int64_t, void*, Format, uintptr_t);
const KernelTable<QuantizeDeviceOp> kQuantize4Device{"quantize_4bit_device",
                                                     {rung(Backend::cuda, cuda::quantize_4bit_device)}};
const KernelTable<DequantizeDeviceOp> kDequantize4Device{"dequantize_4bit_device",
                                                         {rung(Backend::cuda, cuda::dequantize_4bit_device)}};
const KernelRegistration kRegQuantize4Device(kQuantize4Device);
const KernelRegistration kRegDequantize4Device(kDequantize4Device);

const KernelRegistration kRegQuantize4(kQuantize4);
const KernelRegistration kRegDequantize4(kDequantize4);
const KernelRegistration kRegDequantize4Range(kDequantize4Range);

}  // namespace

void quantize_4bit(const void* input, Format dtype, int64_t n, Format type, int64_t blocksize, uint8_t* packed,
                   float* absmax, Backend backend) {
  check_common("quantize_4bit", n, type, blocksize);
  check_input("quantize_4bit", dtype);
  dispatch(kQuantize4, backend).kernel(input, dtype, n, type, blocksize, packed, absmax);
}

void dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n, Format type, int64_t blocksize,
                     void* output, Format dtype, Backend backend) {
  check_common("dequantize_4bit", n, type, blocksize);
  check_input("dequantize_4bit", dtype);
  dispatch(kDequantize4, backend).kernel(packed, absmax, n, type, blocksize, output, dtype);
}

Quant4Sizes quant4_sizes(std::string_view function, int64_t n, Format type, int64_t blocksize) {
  check_common(function, n, type, blocksize);
  return {packed_size(n), num_blocks(n, blocksize)};
}

Quant4Sizes check_quant4_buffers(std::string_view function, int64_t n, Format type, int64_t blocksize,
                                 int64_t packed_bytes, int64_t absmax_count) {
  const Quant4Sizes want = quant4_sizes(function, n, type, blocksize);
  require(packed_bytes == want.packed_bytes, function, "packed holds ", packed_bytes, " bytes, expected ",
          want.packed_bytes, " for ", n, " elements");
  require(absmax_count == want.absmax_count, function, "absmax holds ", absmax_count, " values, expected ",
          want.absmax_count, " for ", n, " elements in blocks of ", blocksize);
  return want;
}

void quantize_4bit_device(const void* input, Format dtype, int64_t n, Format type, int64_t blocksize,
                          uint8_t* packed, float* absmax, uintptr_t stream) {
  const char* fn = "quantize_4bit_device";
  check_common(fn, n, type, blocksize);
  check_input(fn, dtype);
  dispatch(kQuantize4Device, Backend::cuda).kernel(input, dtype, n, type, blocksize, packed, absmax, stream);
}

void dequantize_4bit_device(const uint8_t* packed, const float* absmax, int64_t n, Format type, int64_t blocksize,
                            void* output, Format dtype, uintptr_t stream) {
  const char* fn = "dequantize_4bit_device";
  check_common(fn, n, type, blocksize);
  check_input(fn, dtype);
  dispatch(kDequantize4Device, Backend::cuda).kernel(packed, absmax, n, type, blocksize, output, dtype, stream);
}

void dequantize_4bit_range(const uint8_t* packed, const float* absmax, Format type, int64_t blocksize,
                           int64_t begin, int64_t end, float* output, Backend backend) {
  check_bnb4("dequantize_4bit_range", type, blocksize);
  require(0 <= begin && begin <= end, "dequantize_4bit_range", "bad range [", begin, ", ", end, ")");
  const kernels::Dequant4Job job{packed, absmax, blocksize, &codebook4(type), Format::f32};
  dispatch(kDequantize4Range, backend).kernel(job, begin, end, output);
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

Quantized4 quantize_4bit(const void* input, Format dtype, const std::vector<int64_t>& shape, Format type,
                         int64_t blocksize, bool double_quant, Backend backend) {
  Quantized4 out;
  out.type = type;
  out.blocksize = blocksize;
  out.shape = shape;
  out.dtype = dtype;
  for (int64_t d : shape) require(d >= 0, "quantize_4bit", "negative dimension ", d);
  const int64_t n = out.numel();
  check_common("quantize_4bit", n, type, blocksize);
  check_input("quantize_4bit", dtype);
  out.packed.resize(packed_size(n));
  out.absmax.resize(num_blocks(n, blocksize));
  quantize_4bit(input, dtype, n, type, blocksize, out.packed.data(), out.absmax.data(), backend);
  if (double_quant) {
    out.nested = double_quantize(out.absmax.data(), int64_t(out.absmax.size()));
    out.absmax.clear();
  }
  return out;
}

void dequantize_4bit(const Quantized4& tensor, void* output, Format dtype, Backend backend) {
  const std::vector<float> absmax = tensor.block_absmax();
  dequantize_4bit(tensor.packed.data(), absmax.data(), tensor.numel(), tensor.type, tensor.blocksize, output, dtype,
                  backend);
}

}  // namespace halo
