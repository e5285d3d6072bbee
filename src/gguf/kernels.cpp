// Which SIMD kernel quantizes a type on a backend (nullptr: the scalar rows).
#include "src/gguf/kernels.hpp"

namespace halo::gguf::kernels {

QuantizeKernel quantize_kernel(GgmlType type, Backend backend) {
  if (backend == Backend::avx512) {
    switch (type) {
      case GgmlType::q4_k: return quantize_q4_k_avx512;
      case GgmlType::q5_k: return quantize_q5_k_avx512;
      case GgmlType::q6_k: return quantize_q6_k_avx512;
      default: return nullptr;
    }
  }
  if (backend == Backend::avx2) {
    switch (type) {
      case GgmlType::q4_k: return quantize_q4_k_avx2;
      case GgmlType::q5_k: return quantize_q5_k_avx2;
      case GgmlType::q6_k: return quantize_q6_k_avx2;
      default: return nullptr;
    }
  }
  return nullptr;
}

}  // namespace halo::gguf::kernels
