// Scalar reference of the weighted segment error (the ground truth the SIMD kernels are tested against),
// and the backend table lookup.
#include "halo/backend/dispatch.hpp"
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

namespace {

const KernelTable<SegmentErrorFn> kSegmentError{"hwq_segment_error",
                                                {rung(Backend::scalar, segment_error_scalar),
                                                 rung(Backend::avx2, segment_error_avx2),
                                                 rung(Backend::avx512, segment_error_avx512)}};
const KernelRegistration kRegSegmentError(kSegmentError);

}  // namespace

SegmentErrorFn segment_error_kernel(Backend requested) { return dispatch(kSegmentError, requested).kernel; }

}  // namespace halo::hwq::detail
