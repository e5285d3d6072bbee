// Scalar reference for the 4-bit kernels: the ground truth every other backend
// is tested against.
#include "halo/quant/block.hpp"
#include "src/quant/quant4_kernels.hpp"

namespace halo::kernels {

void quantize4_scalar(const Quant4Job& job, int64_t block_begin, int64_t block_end) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * job.blocksize;
    const int64_t end = begin + job.blocksize < job.n ? begin + job.blocksize : job.n;
    const bool short_block = end - begin < job.blocksize;
    quantize4_block(*job.format, job.input, job.dtype, begin, end, short_block, job.packed, job.absmax + b);
  }
}

void dequantize4_scalar(const Dequant4Job& job, int64_t begin, int64_t end, void* output) {
  for (int64_t i = begin; i < end; ++i)
    store_from_float(output, job.dtype, i - begin,
                     dequantize4_value(*job.format, job.packed, job.absmax, job.blocksize, i));
}

}  // namespace halo::kernels
