// HALO tile quantizer: sparse split, per-tier error table, plan, final codes.
#include "halo/hwq/quantizer.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "halo/backend/backend.hpp"
#include "halo/core/error.hpp"
#include "halo/core/parallel.hpp"
#include "src/hwq/segment_error.hpp"

namespace halo::hwq {

int64_t TileGrid::tile_size(int64_t tile) const {
  const int64_t tr = tile / grid_cols(), tc = tile % grid_cols();
  const int64_t height = std::min(tile_rows, rows - tr * tile_rows);
  const int64_t width = std::min(tile_cols, cols - tc * tile_cols);
  return height * width;
}

int nearest_code(float x, const std::vector<float>& book) {
  const auto upper = std::lower_bound(book.begin(), book.end(), x);
  if (upper == book.begin()) return 0;
  if (upper == book.end()) return static_cast<int>(book.size()) - 1;
  const int hi = static_cast<int>(upper - book.begin());
  return std::fabs(x - book[hi - 1]) <= std::fabs(x - book[hi]) ? hi - 1 : hi;
}

namespace {

// Nearest code in O(1): the books hold integers, so every midpoint between neighbours is a multiple of
// 1/2 and the nearest index is constant on each half-step bucket. The neighbour check keeps exactly the
// ties-to-smaller rule of nearest_code at bucket edges.
class NearestCode {
 public:
  explicit NearestCode(const std::vector<float>& book) : book_(book), low_(book.front()), high_(book.back()) {
    const int buckets = static_cast<int>(2 * (high_ - low_)) + 1;
    bucket_.resize(buckets);
    for (int k = 0; k < buckets; ++k) bucket_[k] = nearest_code(low_ + 0.5f * k + 0.25f, book_);
  }
  detail::BookView view() const {
    return {book_.data(), static_cast<int>(book_.size()), bucket_.data(), low_, high_};
  }
  int operator()(float x) const {
    if (!(x > low_)) return 0;  // also NaN-safe
    if (x >= high_) return static_cast<int>(book_.size()) - 1;
    int i = bucket_[static_cast<int>(std::floor(2.0f * (x - low_)))];
    if (i > 0 && std::fabs(x - book_[i - 1]) <= std::fabs(x - book_[i])) --i;
    else if (i + 1 < static_cast<int>(book_.size()) && std::fabs(x - book_[i + 1]) < std::fabs(x - book_[i])) ++i;
    return i;
  }

 private:
  const std::vector<float>& book_;
  float low_, high_;
  std::vector<int32_t> bucket_;
};

double segment_error(const float* x, const float* s, int64_t count, const std::vector<float>& book,
                     const NearestCode& nearest, float scale, bool simd) {
  if (simd) return detail::segment_error_avx512(x, s, count, nearest.view(), scale);
  double error = 0;
  for (int64_t i = 0; i < count; ++i) {
    const float q = scale == 0.0f ? 0.0f : book[nearest(x[i] / scale)];
    const double diff = static_cast<double>(x[i]) - static_cast<double>(scale * q);
    error += s[i] * diff * diff;
  }
  return error;
}

// Weighted least-squares scale for the current assignment: sum s x q / sum s q^2.
float refit(const float* x, const float* s, int64_t count, const std::vector<float>& book, const NearestCode& nearest,
            float scale) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < count; ++i) {
    const float q = book[nearest(x[i] / scale)];
    num += static_cast<double>(s[i]) * x[i] * q;
    den += static_cast<double>(s[i]) * q * q;
  }
  return den > 0 && num > 0 ? static_cast<float>(num / den) : scale;
}

}  // namespace

bool use_simd(Backend backend) {
  const Backend resolved = resolve(backend);
  require<BackendUnavailable>(resolved != Backend::cuda, "halo_quantize", "the hwq quantizer has no CUDA kernel; use ",
                              "'auto', 'scalar', 'avx2' or 'avx512'");
  return resolved == Backend::avx512;
}

ScaleFit fit_scale(const float* x, const float* s, int64_t count, const std::vector<float>& book, Backend backend) {
  return fit_scale_with(x, s, count, book, use_simd(backend));
}

ScaleFit fit_scale_with(const float* x, const float* s, int64_t count, const std::vector<float>& book, bool simd) {
  float xmax = 0, xmin = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (s[i] <= 0) continue;  // weightless entries (e.g. moved to the sparse part) do not set the range
    xmax = std::max(xmax, x[i]);
    xmin = std::min(xmin, x[i]);
  }
  const float cpos = book.back(), cneg = book.front();
  double start = 0;
  if (xmax > 0 && cpos > 0) start = std::max(start, static_cast<double>(xmax) / cpos);
  if (xmin < 0 && cneg < 0) start = std::max(start, static_cast<double>(xmin) / cneg);
  const NearestCode nearest(book);
  ScaleFit best{0.0f, segment_error(x, s, count, book, nearest, 0.0f, simd)};
  if (start == 0) return best;
  // Clipping the range trades a few large errors for a finer step everywhere: search the clip factor.
  for (int step = 0; step < 15; ++step) {
    const float scale = static_cast<float>(start * (1.0 - 0.05 * step));
    const double error = segment_error(x, s, count, book, nearest, scale, simd);
    if (error < best.error) best = {scale, error};
  }
  for (int round = 0; round < 2 && best.scale > 0; ++round) {
    const float scale = refit(x, s, count, book, nearest, best.scale);
    const double error = segment_error(x, s, count, book, nearest, scale, simd);
    if (!(error < best.error)) break;
    best = {scale, error};
  }
  return best;
}

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

namespace {

void check_inputs(const char* fn, const float* w, const float* s, int64_t rows, int64_t cols,
                  const HardwareModel& model, const QuantizeOptions& o) {
  require(rows > 0 && cols > 0, fn, "weights must be a non-empty 2-D matrix, got ", rows, "x", cols);
  require(cols <= INT32_MAX, fn, "too many columns: ", cols);
  require(o.bits == 4 || o.bits == 8, fn, "bits must be 4 or 8, got ", o.bits);
  require(o.tile_rows >= 1 && o.tile_cols >= 1, fn, "tile must be two positive sizes, got ", o.tile_rows, "x",
          o.tile_cols);
  require(o.max_switches >= 0, fn, "max_switches must be >= 0, got ", o.max_switches);
  require(o.tokens >= 1, fn, "tokens must be >= 1, got ", o.tokens);
  model.validate(fn);
  if (!o.tier_fractions.empty()) {
    require(o.tier_fractions.size() == model.points.size(), fn, "tier_fractions needs one share per operating point (",
            model.points.size(), "), got ", o.tier_fractions.size());
    double total = 0;
    for (double f : o.tier_fractions) {
      require(std::isfinite(f) && f >= 0, fn, "tier_fractions must be >= 0, got ", f);
      total += f;
    }
    require(std::fabs(total - 1.0) < 1e-6, fn, "tier_fractions must sum to 1, got ", total);
  }
  for (int64_t i = 0; i < rows * cols; ++i) {
    require(std::isfinite(w[i]), fn, "weights hold a non-finite value at flat index ", i);
    if (s) require(std::isfinite(s[i]) && s[i] >= 0, fn, "sensitivity must be finite and >= 0, got ", s[i],
                   " at flat index ", i);
  }
}

std::vector<double> shares(const QuantizeOptions& o, size_t points) {
  if (!o.tier_fractions.empty()) return o.tier_fractions;
  // A quarter of the tiles (those that lose least) on the fastest clock, the rest one step slower.
  std::vector<double> result(points, 0.0);
  if (points == 1) {
    result[0] = 1.0;
  } else {
    result[points - 1] = 0.25;
    result[points - 2] = 0.75;
  }
  return result;
}

}  // namespace

Quantized halo_quantize(const float* w, const float* sensitivity, int64_t rows, int64_t cols,
                        const HardwareModel& model, const QuantizeOptions& o) {
  const char* fn = "halo_quantize";
  check_inputs(fn, w, sensitivity, rows, cols, model, o);
  const bool simd = use_simd(o.backend);
  Quantized q;
  q.bits = o.bits;
  q.channel_scales = o.channel_scales;
  q.tokens = o.tokens;
  q.grid = {rows, cols, std::min(o.tile_rows, rows), std::min(o.tile_cols, cols)};
  const TileGrid& grid = q.grid;
  q.sparse = extract_sparse(w, sensitivity, rows, cols, o.salient_fraction, o.outlier_sigma);

  // Dense part: the sparse entries become zero with zero weight, so they neither move a scale nor cost error.
  const int64_t n = rows * cols;
  std::vector<float> dense(w, w + n), weight(n);
  for (int64_t i = 0; i < n; ++i) weight[i] = sensitivity ? sensitivity[i] : std::fabs(w[i]);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = q.sparse.indptr[r]; k < q.sparse.indptr[r + 1]; ++k) {
      dense[r * cols + q.sparse.indices[k]] = 0.0f;
      weight[r * cols + q.sparse.indices[k]] = 0.0f;
    }
  }

  const int num_points = static_cast<int>(model.points.size());
  std::vector<std::vector<float>> books(num_points);
  for (int p = 0; p < num_points; ++p) {
    for (int v : model.code_book(o.bits, p)) books[p].push_back(static_cast<float>(v));
  }
  const int64_t tiles = grid.count(), gcols = grid.grid_cols();
  std::vector<double> error(tiles * num_points, 0.0);
  std::vector<float> scales(static_cast<size_t>(num_points) * rows * gcols, 0.0f);  // per point, per row segment

  parallel_for(tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xs, ss;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = (t / gcols) * grid.tile_rows, c0 = (t % gcols) * grid.tile_cols;
      const int64_t height = std::min(grid.tile_rows, rows - r0), width = std::min(grid.tile_cols, cols - c0);
      for (int p = 0; p < num_points; ++p) {
        float* point_scales = scales.data() + static_cast<size_t>(p) * rows * gcols;
        if (o.channel_scales) {
          for (int64_t r = r0; r < r0 + height; ++r) {
            const ScaleFit fit =
                fit_scale_with(dense.data() + r * cols + c0, weight.data() + r * cols + c0, width, books[p], simd);
            point_scales[r * gcols + t % gcols] = fit.scale;
            error[t * num_points + p] += fit.error;
          }
        } else {
          xs.clear();
          ss.clear();
          for (int64_t r = r0; r < r0 + height; ++r) {
            xs.insert(xs.end(), dense.begin() + r * cols + c0, dense.begin() + r * cols + c0 + width);
            ss.insert(ss.end(), weight.begin() + r * cols + c0, weight.begin() + r * cols + c0 + width);
          }
          const ScaleFit fit = fit_scale_with(xs.data(), ss.data(), static_cast<int64_t>(xs.size()), books[p], simd);
          for (int64_t r = r0; r < r0 + height; ++r) point_scales[r * gcols + t % gcols] = fit.scale;
          error[t * num_points + p] = fit.error;
        }
      }
    }
  });

  // Tiles that gain least from the larger code book get the fastest clock.
  std::vector<int64_t> order(tiles);
  std::iota(order.begin(), order.end(), 0);
  auto gain = [&](int64_t t) { return error[t * num_points + num_points - 1] - error[t * num_points]; };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return gain(a) > gain(b); });
  const std::vector<double> share = shares(o, num_points);
  q.wanted_point.assign(tiles, num_points - 1);
  double cumulative = 0;
  int64_t assigned = 0;
  for (int p = 0; p < num_points - 1; ++p) {
    cumulative += share[p];
    const int64_t upto = std::min<int64_t>(tiles, std::llround(cumulative * tiles));
    for (; assigned < upto; ++assigned) q.wanted_point[order[assigned]] = p;
  }

  std::vector<int64_t> macs(tiles);
  for (int64_t t = 0; t < tiles; ++t) macs[t] = grid.tile_size(t) * o.tokens;
  q.plan = plan_dvfs(q.wanted_point, macs, model, o.max_switches);

  q.codes.assign(n, 0);
  q.scales.assign(rows * gcols, 0.0f);
  q.tile_error.assign(tiles, 0.0);
  parallel_for(tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int p = q.plan.point[t];
      const std::vector<float>& book = books[p];
      const NearestCode nearest(book);
      const float* point_scales = scales.data() + static_cast<size_t>(p) * rows * gcols;
      const int64_t r0 = (t / gcols) * grid.tile_rows, c0 = (t % gcols) * grid.tile_cols;
      const int64_t height = std::min(grid.tile_rows, rows - r0), width = std::min(grid.tile_cols, cols - c0);
      for (int64_t r = r0; r < r0 + height; ++r) {
        const float scale = point_scales[r * gcols + t % gcols];
        q.scales[r * gcols + t % gcols] = scale;
        for (int64_t c = c0; c < c0 + width; ++c) {
          const float x = dense[r * cols + c];
          q.codes[r * cols + c] = scale == 0.0f ? 0 : static_cast<int8_t>(book[nearest(x / scale)]);
        }
      }
      q.tile_error[t] = error[t * num_points + p];
    }
  });
  return q;
}

void dequantize(const Quantized& q, float* out) {
  const TileGrid& grid = q.grid;
  const int64_t gcols = grid.grid_cols();
  parallel_for(grid.rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c < grid.cols; ++c) {
        out[r * grid.cols + c] = static_cast<float>(q.codes[r * grid.cols + c]) * q.scales[r * gcols + c / grid.tile_cols];
      }
      for (int64_t k = q.sparse.indptr[r]; k < q.sparse.indptr[r + 1]; ++k) {
        out[r * grid.cols + q.sparse.indices[k]] = q.sparse.values[k];  // dense holds 0 there: restore exactly
      }
    }
  });
}

void rtn_quantize(const float* w, int64_t rows, int64_t cols, int bits, int64_t group_size, int8_t* codes,
                  float* scales) {
  const char* fn = "rtn_quantize";
  require(bits >= 2 && bits <= 8, fn, "bits must be in 2..8, got ", bits);
  require(rows > 0 && cols > 0, fn, "weights must be a non-empty 2-D matrix, got ", rows, "x", cols);
  const int64_t group = group_size <= 0 ? cols : std::min(group_size, cols);
  const int64_t groups = (cols + group - 1) / group;
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
