// Private, plain translation units only: a code book with its half-step bucket
// table, and the scalar nearest-code rule every kernel reproduces.
#pragma once

#include <cmath>
#include <vector>

#include "src/hwq/segment_error.hpp"

namespace halo::hwq::detail {

// Index of the cell holding x: the number of midpoints strictly below it (nearest value, ties to the
// smaller; NaN to 0). The books hold integers, so every midpoint is a multiple of 1/2 and the candidate from
// the half-step bucket table is off by at most one, which the midpoint checks settle.
inline int nearest_index(float x, const BookView& book) {
  if (!(x > book.low)) return 0;  // also NaN
  if (x >= book.high) return book.size - 1;
  int i = static_cast<int>(book.bucket[static_cast<int>(std::floor(2.0f * (x - book.low)))]);
  if (i > 0 && x <= book.mids[i - 1]) {
    --i;
  } else if (i + 1 < book.size && x > book.mids[i]) {
    ++i;
  }
  return i;
}

class BookTable {
 public:
  explicit BookTable(std::vector<float> values);
  BookView view() const {
    return {values_.data(), static_cast<int>(values_.size()), bucket_.data(), mids_.data(), values_.front(),
            values_.back()};
  }
  const std::vector<float>& values() const { return values_; }
  int nearest(float x) const { return nearest_index(x, view()); }

 private:
  std::vector<float> values_;
  std::vector<float> bucket_;
  std::vector<float> mids_;
};

}  // namespace halo::hwq::detail
