// The full-precision side part: salient weights (top fraction by sensitivity * w^2) and k-sigma row outliers.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "halo/core/error.hpp"
#include "halo/hwq/quantizer.hpp"

namespace halo::hwq {

SparsePart extract_sparse(const float* w, const float* sensitivity, int64_t rows, int64_t cols,
                          double salient_fraction, double outlier_sigma) {
  const char* fn = "extract_sparse";
  require(salient_fraction >= 0 && salient_fraction < 1, fn, "salient_fraction must be in [0, 1), got ",
          salient_fraction);
  require(!std::isnan(outlier_sigma), fn, "outlier_sigma must not be NaN");
  const int64_t n = rows * cols;
  std::vector<uint8_t> keep(n, 0);
  const int64_t salient = salient_fraction > 0 ? static_cast<int64_t>(std::ceil(salient_fraction * n)) : 0;
  if (salient > 0) {
    std::vector<float> score(n);
    for (int64_t i = 0; i < n; ++i) {
      const float s = sensitivity ? sensitivity[i] : std::fabs(w[i]);
      score[i] = s * w[i] * w[i];
    }
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::nth_element(order.begin(), order.begin() + (salient - 1), order.end(),
                     [&](int64_t a, int64_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
    for (int64_t i = 0; i < salient; ++i) keep[order[i]] = 1;
  }
  if (outlier_sigma > 0 && std::isfinite(outlier_sigma)) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = w + r * cols;
      double sum = 0, sum_sq = 0;
      for (int64_t c = 0; c < cols; ++c) sum += row[c];
      const double mean = sum / cols;
      for (int64_t c = 0; c < cols; ++c) sum_sq += (row[c] - mean) * (row[c] - mean);
      const double limit = outlier_sigma * std::sqrt(sum_sq / cols);
      for (int64_t c = 0; c < cols; ++c) {
        if (std::fabs(row[c] - mean) > limit) keep[r * cols + c] = 1;
      }
    }
  }
  SparsePart sparse;
  sparse.rows = rows;
  sparse.cols = cols;
  sparse.indptr.assign(1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      if (keep[r * cols + c]) {
        sparse.indices.push_back(static_cast<int32_t>(c));
        sparse.values.push_back(w[r * cols + c]);
      }
    }
    sparse.indptr.push_back(static_cast<int64_t>(sparse.values.size()));
  }
  return sparse;
}

}  // namespace halo::hwq
