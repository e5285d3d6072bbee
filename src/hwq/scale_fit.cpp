// Nearest-code rule, book tables and the weighted scale search.
#include <algorithm>
#include <cmath>

#include "halo/core/error.hpp"
#include "halo/hwq/quantizer.hpp"
#include "src/hwq/book_table.hpp"
#include "src/hwq/scale_fit.hpp"

namespace halo::hwq {

int nearest_code(float x, const std::vector<float>& book) {
  const auto upper = std::lower_bound(book.begin(), book.end(), x);
  if (upper == book.begin()) return 0;
  if (upper == book.end()) return static_cast<int>(book.size()) - 1;
  const int hi = static_cast<int>(upper - book.begin());
  return std::fabs(x - book[hi - 1]) <= std::fabs(x - book[hi]) ? hi - 1 : hi;
}

namespace detail {

BookTable::BookTable(std::vector<float> values) : values_(std::move(values)) {
  require(!values_.empty(), "BookTable", "empty code book");
  for (size_t i = 0; i < values_.size(); ++i) {
    require(values_[i] == std::nearbyint(values_[i]) && std::fabs(values_[i]) <= 32768.0f, "BookTable",
            "code values must be integers in -32768..32768, got ", values_[i]);
    require(i == 0 || values_[i] > values_[i - 1], "BookTable", "code values must be sorted and distinct");
  }
  for (size_t i = 0; i + 1 < values_.size(); ++i) mids_.push_back(0.5f * (values_[i] + values_[i + 1]));
  const int buckets = static_cast<int>(2 * (values_.back() - values_.front())) + 1;
  bucket_.resize(buckets);
  for (int k = 0; k < buckets; ++k) {
    bucket_[k] = static_cast<float>(nearest_code(values_.front() + 0.5f * k + 0.25f, values_));
  }
}

namespace {

// Weighted least-squares scale for the current assignment: sum s x q / sum s q^2.
float refit(const float* x, const float* s, int64_t count, const BookTable& book, float scale) {
  double num = 0, den = 0;
  const BookView view = book.view();
  for (int64_t i = 0; i < count; ++i) {
    const float q = view.values[nearest_index(x[i] / scale, view)];
    num += static_cast<double>(s[i]) * x[i] * q;
    den += static_cast<double>(s[i]) * q * q;
  }
  return den > 0 && num > 0 ? static_cast<float>(num / den) : scale;
}

}  // namespace

ScaleFit fit_scale_with(const float* x, const float* s, int64_t count, const BookTable& book, SegmentErrorFn kernel) {
  float xmax = 0, xmin = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (s[i] <= 0) continue;  // weightless entries (e.g. moved to the sparse part) do not set the range
    xmax = std::max(xmax, x[i]);
    xmin = std::min(xmin, x[i]);
  }
  const float cpos = book.values().back(), cneg = book.values().front();
  double start = 0;
  if (xmax > 0 && cpos > 0) start = std::max(start, static_cast<double>(xmax) / cpos);
  if (xmin < 0 && cneg < 0) start = std::max(start, static_cast<double>(xmin) / cneg);
  const BookView view = book.view();
  ScaleFit best{0.0f, kernel(x, s, count, view, 0.0f)};
  if (start == 0) return best;
  // Clipping the range trades a few large errors for a finer step everywhere: search the clip factor.
  for (int step = 0; step < 15; ++step) {
    const float scale = static_cast<float>(start * (1.0 - 0.05 * step));
    const double error = kernel(x, s, count, view, scale);
    if (error < best.error) best = {scale, error};
  }
  for (int round = 0; round < 2 && best.scale > 0; ++round) {
    const float scale = refit(x, s, count, book, best.scale);
    const double error = kernel(x, s, count, view, scale);
    if (!(error < best.error)) break;
    best = {scale, error};
  }
  return best;
}

}  // namespace detail

ScaleFit fit_scale(const float* x, const float* s, int64_t count, const std::vector<float>& book, Backend backend) {
  require(count >= 0, "fit_scale", "count must be >= 0, got ", count);
  return detail::fit_scale_with(x, s, count, detail::BookTable(book), detail::segment_error_kernel(backend));
}

}  // namespace halo::hwq
