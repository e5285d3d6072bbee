// Which SIMD kernel quantizes a type on a backend (nullptr: the scalar rows).
#include "src/gguf/kernels.hpp"

namespace halo::gguf::kernels {

QuantizeKernel quantize_kernel(GgmlType type, Backend backend) {
  (void)type;
  (void)backend;
  return nullptr;
}

}  // namespace halo::gguf::kernels
