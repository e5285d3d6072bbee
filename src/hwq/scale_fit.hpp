// Private: the scale search over a prepared book table with a chosen kernel (quantizer.cpp, scale_fit.cpp).
#pragma once

#include "halo/hwq/quantizer.hpp"
#include "src/hwq/book_table.hpp"

namespace halo::hwq::detail {

ScaleFit fit_scale_with(const float* x, const float* s, int64_t count, const BookTable& book, SegmentErrorFn kernel);

}  // namespace halo::hwq::detail
