// AVX512 K-quant kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq, no FMA contraction):
// lane-per-sub-block searches that give the scalar reference's bytes.
#include <cassert>
#include <cstdint>

#include <xsimd/xsimd.hpp>

#include "halo/gguf/quants.hpp"
#include "src/gguf/blocks.hpp"
#include "src/gguf/kernels.hpp"
#include "src/gguf/kquants_search.hpp"

namespace halo::gguf::kernels {
namespace {
struct Isa {
  using arch = xsimd::avx512bw;
};
}  // namespace
}  // namespace halo::gguf::kernels

#include "src/gguf/kquants_simd.hpp"

namespace halo::gguf::kernels {

void quantize_q4_k_avx512(const float* in, void* out, int64_t blocks) { quantize_k<15>(in, out, blocks, 144); }
void quantize_q5_k_avx512(const float* in, void* out, int64_t blocks) { quantize_k<31>(in, out, blocks, 176); }
void quantize_q6_k_avx512(const float* in, void* out, int64_t blocks) { quantize_q6(in, out, blocks); }

}  // namespace halo::gguf::kernels
