// AVX2 AdamW8bit kernel (compiled with ISA flags; see adamw8bit_simd.hpp).
#include <cassert>

#include <xsimd/xsimd.hpp>

#include "src/optim/adamw8bit_kernels.hpp"

namespace halo::kernels {
namespace {
using Arch = xsimd::avx2;
}  // namespace
}  // namespace halo::kernels

#include "src/optim/adamw8bit_simd.hpp"

namespace halo::kernels {

void adamw8bit_avx2(const AdamW8bitJob& job, int64_t block_begin, int64_t block_end) {
  run_blocks(job, block_begin, block_end);
}

}  // namespace halo::kernels
