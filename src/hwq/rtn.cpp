// Symmetric round-to-nearest baseline with one absmax scale per group of a row.
#include <algorithm>
#include <cmath>

#include "halo/core/error.hpp"
#include "halo/core/parallel.hpp"
#include "halo/hwq/quantizer.hpp"

namespace halo::hwq {

int64_t rtn_groups(int64_t rows, int64_t cols, int bits, int64_t group_size) {
  const char* fn = "rtn_quantize";
  require(bits >= 2 && bits <= 8, fn, "bits must be in 2..8, got ", bits);
  // Checked before any division by the group size: an empty row would make it zero.
  require(rows > 0 && cols > 0, fn, "weights must be a non-empty 2-D matrix, got ", rows, "x", cols);
  const int64_t group = group_size <= 0 ? cols : std::min(group_size, cols);
  return (cols + group - 1) / group;
}

void rtn_quantize(const float* w, int64_t rows, int64_t cols, int bits, int64_t group_size, int8_t* codes,
                  float* scales) {
  const int64_t groups = rtn_groups(rows, cols, bits, group_size);
  const int64_t group = group_size <= 0 ? cols : std::min(group_size, cols);
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1), qmin = -qmax - 1;
  parallel_for(rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t c0 = g * group, c1 = std::min(cols, c0 + group);
        float absmax = 0;
        for (int64_t c = c0; c < c1; ++c) absmax = std::max(absmax, std::fabs(w[r * cols + c]));
        const float scale = absmax / qmax;
        scales[r * groups + g] = scale;
        for (int64_t c = c0; c < c1; ++c) {
          const float v = scale == 0.0f ? 0.0f : std::nearbyint(w[r * cols + c] / scale);
          codes[r * cols + c] = static_cast<int8_t>(std::clamp(v, qmin, qmax));
        }
      }
    }
  });
}

}  // namespace halo::hwq
