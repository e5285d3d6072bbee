// Scalar reference of the weighted segment error (the ground truth the SIMD kernels are tested against),
// and the backend table lookup.
#include "halo/core/error.hpp"
#include "src/hwq/book_table.hpp"
#include "src/hwq/segment_error.hpp"

namespace halo::hwq::detail {

double segment_error_scalar(const float* x, const float* s, int64_t count, const BookView& book, float scale) {
  double error = 0;
  for (int64_t i = 0; i < count; ++i) {
    const float q = scale == 0.0f ? 0.0f : book.values[nearest_index(x[i] / scale, book)];
    const double diff = static_cast<double>(x[i]) - static_cast<double>(scale * q);
    error += static_cast<double>(s[i]) * diff * diff;
  }
  return error;
}

SegmentErrorFn segment_error_kernel(Backend requested) {
  const Backend backend = resolve(requested);
  const size_t index = static_cast<size_t>(backend) - static_cast<size_t>(Backend::scalar);
  const SegmentErrorFn kernel = index < kSegmentError.size() ? kSegmentError[index] : nullptr;
  require<BackendUnavailable>(kernel != nullptr, "halo_quantize", "the hwq quantizer has no ", backend_name(backend),
                              " kernel; use 'auto', 'scalar', 'avx2' or 'avx512'");
  return kernel;
}

}  // namespace halo::hwq::detail
