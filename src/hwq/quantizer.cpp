// HALO tile quantizer pipeline: sparse split, tile scores, rung assignment, plan, books, final codes.
#include "halo/hwq/quantizer.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "halo/core/convert.hpp"
#include "halo/core/error.hpp"
#include "halo/core/parallel.hpp"
#include "halo/hwq/codebook.hpp"
#include "src/hwq/book_table.hpp"
#include "src/hwq/scale_fit.hpp"

namespace halo::hwq {

int64_t TileGrid::tile_size(int64_t tile) const {
  const int64_t tr = tile / grid_cols(), tc = tile % grid_cols();
  const int64_t height = std::min(tile_rows, rows - tr * tile_rows);
  const int64_t width = std::min(tile_cols, cols - tc * tile_cols);
  return height * width;
}

std::string_view grid_mode_name(GridMode grid) {
  switch (grid) {
    case GridMode::subset: return "subset";
    case GridMode::int4: return "int4";
    case GridMode::int8: return "int8";
  }
  return "?";
}

GridMode parse_grid_mode(std::string_view name) {
  for (GridMode g : {GridMode::subset, GridMode::int4, GridMode::int8})
    if (name == grid_mode_name(g)) return g;
  fail("halo_quantize", "grid must be 'subset', 'int4' or 'int8', got '", name, "'");
}

std::string_view assign_name(Assign assign) { return assign == Assign::error_gain ? "error_gain" : "sensitivity"; }

Assign parse_assign(std::string_view name) {
  if (name == "sensitivity") return Assign::sensitivity;
  if (name == "error_gain") return Assign::error_gain;
  fail("halo_quantize", "assign must be 'sensitivity' or 'error_gain', got '", name, "'");
}

std::string_view preset_name(Preset preset) {
  switch (preset) {
    case Preset::performance: return "performance";
    case Preset::balanced: return "balanced";
    case Preset::accuracy: return "accuracy";
  }
  return "?";
}

Preset parse_preset(std::string_view name) {
  for (Preset p : {Preset::performance, Preset::balanced, Preset::accuracy})
    if (name == preset_name(p)) return p;
  fail("halo_quantize", "preset must be 'performance', 'balanced' or 'accuracy', got '", name, "'");
}

int mac_bits(GridMode grid) { return grid == GridMode::int4 ? 4 : 8; }

std::vector<double> preset_split(Preset preset, size_t rungs) {
  if (rungs <= 1) return {};
  double nominal = 0, middle = 0.8;  // sensitivity share kept at rung 0, and at rungs before the last
  if (preset == Preset::performance) middle = 0.5;
  if (preset == Preset::accuracy) nominal = 0.5, middle = 1.0;
  if (rungs == 2) return {middle};
  std::vector<double> split(rungs - 1, middle);
  split[0] = nominal;
  return split;
}

namespace {

// A run of weights sharing one scale: a row inside a tile, or a whole tile (gathered contiguously).
struct Segment {
  const float* x;
  const float* s;
  int64_t count;
  int64_t row;  // first matrix row it covers
  int64_t rows;  // matrix rows it covers (1 for row scales)
};

struct Layout {
  std::vector<Segment> segments;
  std::vector<int64_t> begin;  // per tile + 1: its segments are [begin[t], begin[t + 1])
  std::vector<float> gathered_x, gathered_s;  // tile-scale mode: tiles copied contiguously
};

Layout make_layout(const TileGrid& grid, const std::vector<float>& dense, const std::vector<float>& weight,
                   bool channel_scales) {
  Layout layout;
  const int64_t gcols = grid.grid_cols(), cols = grid.cols;
  if (!channel_scales) {
    layout.gathered_x.reserve(dense.size());
    layout.gathered_s.reserve(dense.size());
  }
  std::vector<int64_t> offsets;
  for (int64_t t = 0; t < grid.count(); ++t) {
    layout.begin.push_back(static_cast<int64_t>(layout.segments.size()));
    const int64_t r0 = (t / gcols) * grid.tile_rows, c0 = (t % gcols) * grid.tile_cols;
    const int64_t height = std::min(grid.tile_rows, grid.rows - r0), width = std::min(grid.tile_cols, cols - c0);
    if (channel_scales) {
      for (int64_t r = r0; r < r0 + height; ++r) {
        layout.segments.push_back({dense.data() + r * cols + c0, weight.data() + r * cols + c0, width, r, 1});
      }
    } else {
      offsets.push_back(static_cast<int64_t>(layout.gathered_x.size()));
      for (int64_t r = r0; r < r0 + height; ++r) {
        layout.gathered_x.insert(layout.gathered_x.end(), dense.begin() + r * cols + c0,
                                 dense.begin() + r * cols + c0 + width);
        layout.gathered_s.insert(layout.gathered_s.end(), weight.begin() + r * cols + c0,
                                 weight.begin() + r * cols + c0 + width);
      }
      layout.segments.push_back({nullptr, nullptr, height * width, r0, height});
    }
  }
  layout.begin.push_back(static_cast<int64_t>(layout.segments.size()));
  if (!channel_scales) {  // pointers only once the buffers stopped growing
    for (int64_t t = 0; t < grid.count(); ++t) {
      layout.segments[t].x = layout.gathered_x.data() + offsets[t];
      layout.segments[t].s = layout.gathered_s.data() + offsets[t];
    }
  }
  return layout;
}

// One rung's book and the scale fitted to every segment of its tiles (indexed by segment id).
struct RungFit {
  std::vector<int> book;
  std::vector<float> scale;
  std::vector<double> error;
  double total = std::numeric_limits<double>::infinity();
};

std::vector<float> as_floats(const std::vector<int>& values) { return {values.begin(), values.end()}; }

void fit_segments(const Layout& layout, const std::vector<int64_t>& tiles, const std::vector<int>& book,
                  detail::SegmentErrorFn kernel, RungFit& fit) {
  const detail::BookTable table(as_floats(book));
  fit.book = book;
  fit.scale.assign(layout.segments.size(), 0.0f);
  fit.error.assign(layout.segments.size(), 0.0);
  parallel_for(static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t k = layout.begin[tiles[i]]; k < layout.begin[tiles[i] + 1]; ++k) {
        const Segment& seg = layout.segments[k];
        const ScaleFit f = detail::fit_scale_with(seg.x, seg.s, seg.count, table, kernel);
        fit.scale[k] = f.scale;
        fit.error[k] = f.error;
      }
    }
  });
  fit.total = 0;
  for (int64_t t : tiles) {
    for (int64_t k = layout.begin[t]; k < layout.begin[t + 1]; ++k) fit.total += fit.error[k];
  }
}

// Normalised weights r = x / scale weighted by s * scale^2, so that the histogram's squared distances are the
// segment errors for those scales. `scales` null: each segment's absmax over the largest admitted magnitude.
WeightedHistogram histogram(const Layout& layout, const std::vector<int64_t>& tiles, const float* scales,
                            double magnitude) {
  WeightedHistogram h;
  for (int64_t t : tiles) {
    for (int64_t k = layout.begin[t]; k < layout.begin[t + 1]; ++k) {
      const Segment& seg = layout.segments[k];
      double scale = scales ? scales[k] : 0.0;
      if (!scales) {
        float absmax = 0;
        for (int64_t i = 0; i < seg.count; ++i) {
          if (seg.s[i] > 0) absmax = std::max(absmax, std::fabs(seg.x[i]));
        }
        scale = absmax / magnitude;
      }
      if (!(scale > 0)) continue;
      for (int64_t i = 0; i < seg.count; ++i) h.add(seg.x[i] / scale, seg.s[i] * scale * scale);
    }
  }
  return h;
}

// Subset mode: alternate the exact best book for the current scales with the scale search for that book.
// With energy_weight > 0 the book also pays for switching activity: mu * samples * energy(v), with mu set
// once per rung so that the unpenalised first book's energy costs energy_weight times its error.
RungFit fit_rung(const Layout& layout, const std::vector<int64_t>& tiles, const std::vector<int>& admitted,
                 int book_size, bool search, int iterations, double energy_weight, const std::vector<double>& energy,
                 detail::SegmentErrorFn kernel) {
  RungFit best;
  if (!search || static_cast<int>(admitted.size()) <= book_size) {
    fit_segments(layout, tiles, admitted, kernel, best);
    return best;
  }
  int magnitude = 0;
  for (int v : admitted) magnitude = std::max(magnitude, std::abs(v));
  const WeightedHistogram first = histogram(layout, tiles, nullptr, magnitude);
  std::vector<int> book = best_book(first, admitted, book_size);
  EnergyTerm term{&energy, 0.0};
  if (energy_weight > 0) {
    const double error = book_cost(first, book), activity = book_energy(first, book, energy);
    if (error > 0 && activity > 0) {
      term.weight = energy_weight * error / activity;
      book = best_book(first, admitted, book_size, term);
    }
  }
  double best_objective = std::numeric_limits<double>::infinity();
  for (int round = 0; round < iterations; ++round) {
    RungFit fit;
    fit_segments(layout, tiles, book, kernel, fit);
    const WeightedHistogram fitted = histogram(layout, tiles, fit.scale.data(), 0);
    const double objective = fit.total + term.weight * book_energy(fitted, book, energy);
    if (!(objective < best_objective)) break;
    best_objective = objective;
    best = std::move(fit);
    if (round + 1 == iterations) break;
    std::vector<int> next = best_book(fitted, admitted, book_size, term);
    if (next == book) break;
    book = std::move(next);
  }
  return best;
}

void check_inputs(const char* fn, const float* w, const float* s, int64_t rows, int64_t cols,
                  const QuantizeOptions& o, size_t rungs) {
  require(rows > 0 && cols > 0, fn, "weights must be a non-empty 2-D matrix, got ", rows, "x", cols);
  require(cols <= INT32_MAX, fn, "too many columns: ", cols);
  require(o.tile_rows >= 1 && o.tile_cols >= 1, fn, "tile must be two positive sizes, got ", o.tile_rows, "x",
          o.tile_cols);
  require(o.max_switches >= 0, fn, "max_switches must be >= 0, got ", o.max_switches);
  require(o.tokens >= 1, fn, "tokens must be >= 1, got ", o.tokens);
  require(o.book_iterations >= 1 && o.book_iterations <= 100, fn, "book_iterations must be in 1..100, got ",
          o.book_iterations);
  require(std::isfinite(o.energy_weight) && o.energy_weight >= 0, fn, "energy_weight must be >= 0, got ",
          o.energy_weight);
  if (o.assign == Assign::sensitivity) {
    require(o.tier_fractions.empty(), fn, "tier_fractions apply to assign='error_gain'; use split for 'sensitivity'");
    if (!o.split.empty()) {
      require(o.split.size() + 1 == rungs, fn, "split needs one threshold per rung but the last (", rungs - 1,
              " for this ladder), got ", o.split.size());
      for (size_t i = 0; i < o.split.size(); ++i) {
        require(std::isfinite(o.split[i]) && o.split[i] >= 0 && o.split[i] <= 1, fn,
                "split thresholds must be in [0, 1], got ", o.split[i]);
        require(i == 0 || o.split[i] >= o.split[i - 1], fn, "split thresholds must not decrease, got ",
                o.split[i - 1], " then ", o.split[i]);
      }
    }
  } else {
    require(o.split.empty(), fn, "split applies to assign='sensitivity'; use tier_fractions for 'error_gain'");
    if (!o.tier_fractions.empty()) {
      require(o.tier_fractions.size() == rungs, fn, "tier_fractions needs one share per rung of the ladder (", rungs,
              "), got ", o.tier_fractions.size());
      double total = 0;
      for (double f : o.tier_fractions) {
        require(std::isfinite(f) && f >= 0, fn, "tier_fractions must be >= 0, got ", f);
        total += f;
      }
      require(std::fabs(total - 1.0) < 1e-6, fn, "tier_fractions must sum to 1, got ", total);
    }
  }
  for (int64_t i = 0; i < rows * cols; ++i) {
    require(std::isfinite(w[i]), fn, "weights hold a non-finite value at flat index ", i);
    if (s) require(std::isfinite(s[i]) && s[i] >= 0, fn, "sensitivity must be finite and >= 0, got ", s[i],
                   " at flat index ", i);
  }
}

// The paper's rule: most sensitive tiles first; a tile wants the first rung whose cumulative threshold its
// preceding share of the layer's sensitivity has not reached.
std::vector<int> wanted_by_sensitivity(const std::vector<double>& score, const std::vector<double>& mass,
                                       const std::vector<double>& split, size_t rungs) {
  const int64_t tiles = static_cast<int64_t>(score.size());
  std::vector<int64_t> order(tiles);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return score[a] > score[b]; });
  double total = std::accumulate(mass.begin(), mass.end(), 0.0);
  std::vector<int> wanted(tiles, static_cast<int>(rungs) - 1);
  double before = 0;
  for (int64_t t : order) {
    const double share = total > 0 ? before / total : 0.0;
    for (size_t r = 0; r + 1 < rungs; ++r) {
      if (share < split[r]) {
        wanted[t] = static_cast<int>(r);
        break;
      }
    }
    before += mass[t];
  }
  return wanted;
}

// Tiles that lose most on the aggressive rungs stay near nominal; shares of tiles per rung.
std::vector<int> wanted_by_error_gain(const std::vector<std::vector<double>>& error, std::vector<double> shares) {
  const size_t rungs = error.size();
  const int64_t tiles = static_cast<int64_t>(error[0].size());
  if (shares.empty()) {
    shares.assign(rungs, 0.0);
    if (rungs == 1) {
      shares[0] = 1.0;
    } else {
      shares[rungs - 1] = 0.25;
      shares[rungs - 2] = 0.75;
    }
  }
  std::vector<int64_t> order(tiles);
  std::iota(order.begin(), order.end(), 0);
  auto gain = [&](int64_t t) { return error[rungs - 1][t] - error[0][t]; };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return gain(a) > gain(b); });
  std::vector<int> wanted(tiles, static_cast<int>(rungs) - 1);
  double cumulative = 0;
  int64_t assigned = 0;
  for (size_t r = 0; r + 1 < rungs; ++r) {
    cumulative += shares[r];
    const int64_t upto = std::min<int64_t>(tiles, std::llround(cumulative * tiles));
    for (; assigned < upto; ++assigned) wanted[order[assigned]] = static_cast<int>(r);
  }
  return wanted;
}

// Code counts of symmetric round-to-nearest with `bits` per code, absmax scale per `group` columns of a row,
// on the signed `grid_bits` grid (index value + 2^(grid_bits - 1)).
std::vector<int64_t> rtn_histogram(const float* w, int64_t rows, int64_t cols, int bits, int64_t group,
                                   int grid_bits) {
  std::vector<int64_t> counts(size_t{1} << grid_bits, 0);
  const int offset = 1 << (grid_bits - 1);
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1), qmin = -qmax - 1;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c0 = 0; c0 < cols; c0 += group) {
      const int64_t c1 = std::min(cols, c0 + group);
      float absmax = 0;
      for (int64_t c = c0; c < c1; ++c) absmax = std::max(absmax, std::fabs(w[r * cols + c]));
      const float scale = absmax / qmax;
      for (int64_t c = c0; c < c1; ++c) {
        const float v = scale == 0.0f ? 0.0f : std::clamp(std::nearbyint(w[r * cols + c] / scale), qmin, qmax);
        ++counts[static_cast<int>(v) + offset];
      }
    }
  }
  return counts;
}

int code_bits(size_t book_size) {
  int bits = 0;
  while ((size_t{1} << bits) < book_size) ++bits;
  return bits;
}

}  // namespace

Quantized halo_quantize(const float* w, const float* sensitivity, int64_t rows, int64_t cols,
                        const HardwareModel& model, const QuantizeOptions& o) {
  const char* fn = "halo_quantize";
  require(w != nullptr, fn, "weights must not be null");
  model.validate(fn);
  const int bits = mac_bits(o.grid);
  const std::vector<int> ladder = model.ladder(o.mode, bits);
  const size_t rungs = ladder.size();
  check_inputs(fn, w, sensitivity, rows, cols, o, rungs);
  const detail::SegmentErrorFn kernel = detail::segment_error_kernel(o.backend);
  Quantized q;
  q.grid_mode = o.grid;
  q.mode = o.mode;
  q.bits = bits;
  q.channel_scales = o.channel_scales;
  q.tokens = o.tokens;
  q.ladder = ladder;
  q.grid = {rows, cols, std::min(o.tile_rows, rows), std::min(o.tile_cols, cols)};
  const TileGrid& grid = q.grid;
  q.sparse = extract_sparse(w, sensitivity, rows, cols, o.salient_fraction, o.outlier_sigma);
  q.sparse_fp16 = o.sparse_fp16;
  if (o.sparse_fp16) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = q.sparse.indptr[r]; k < q.sparse.indptr[r + 1]; ++k) {
        float& value = q.sparse.values[k];
        require(std::fabs(value) <= 65504.0f, fn, "the kept weight ", value, " at (", r, ", ", q.sparse.indices[k],
                ") does not fit float16; keep the side part in float32 (sparse_dtype='float32')");
        value = f16_to_float(float_to_f16(value));
      }
    }
  }

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
  const Layout layout = make_layout(grid, dense, weight, o.channel_scales);
  const int64_t tiles = grid.count(), gcols = grid.grid_cols();

  std::vector<double> mass(tiles, 0.0);
  q.tile_score.assign(tiles, 0.0);
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t k = layout.begin[t]; k < layout.begin[t + 1]; ++k) {
      const Segment& seg = layout.segments[k];
      for (int64_t i = 0; i < seg.count; ++i) mass[t] += seg.s[i];
    }
    q.tile_score[t] = mass[t] / static_cast<double>(grid.tile_size(t));
  }

  std::vector<std::vector<int>> admitted(rungs);
  std::vector<int> book_size(rungs);
  for (size_t r = 0; r < rungs; ++r) {
    admitted[r] = model.admitted(bits, ladder[r]);
    book_size[r] = o.grid == GridMode::subset ? model.points[ladder[r]].book_size : static_cast<int>(admitted[r].size());
  }
  const bool search = o.grid == GridMode::subset;
  std::vector<int64_t> all(tiles);
  std::iota(all.begin(), all.end(), 0);

  std::vector<int> wanted;
  std::vector<RungFit> trial(rungs);
  if (o.assign == Assign::sensitivity) {
    const std::vector<double> split = o.split.empty() ? preset_split(o.preset, rungs) : o.split;
    wanted = wanted_by_sensitivity(q.tile_score, mass, split, rungs);
  } else {
    std::vector<std::vector<double>> error(rungs, std::vector<double>(tiles, 0.0));
    for (size_t r = 0; r < rungs; ++r) {
      trial[r] = fit_rung(layout, all, admitted[r], book_size[r], search, o.book_iterations, o.energy_weight, model.energy8, kernel);
      for (int64_t t = 0; t < tiles; ++t) {
        for (int64_t k = layout.begin[t]; k < layout.begin[t + 1]; ++k) error[r][t] += trial[r].error[k];
      }
    }
    wanted = wanted_by_error_gain(error, o.tier_fractions);
  }

  std::vector<int64_t> macs(tiles);
  for (int64_t t = 0; t < tiles; ++t) macs[t] = grid.tile_size(t) * o.tokens;
  q.plan = plan_dvfs(wanted, macs, model, o.max_switches, o.mode, bits);
  q.wanted_point.resize(tiles);
  for (int64_t t = 0; t < tiles; ++t) q.wanted_point[t] = ladder[wanted[t]];

  // Books and scales for the tiles each rung actually runs.
  std::vector<int> rung_of(tiles, 0);
  std::vector<std::vector<int64_t>> members(rungs);
  for (int64_t t = 0; t < tiles; ++t) {
    rung_of[t] = static_cast<int>(std::find(ladder.begin(), ladder.end(), q.plan.point[t]) - ladder.begin());
    members[rung_of[t]].push_back(t);
  }
  std::vector<RungFit> fits(rungs);
  q.books.resize(rungs);
  for (size_t r = 0; r < rungs; ++r) {
    if (!search && !trial[r].book.empty()) {
      fits[r] = std::move(trial[r]);  // fixed book: the scales of every tile are already fitted
    } else if (!members[r].empty() || !search) {
      fits[r] = fit_rung(layout, members[r], admitted[r], book_size[r], search, o.book_iterations, o.energy_weight,
                          model.energy8, kernel);
    } else {
      fits[r].book = admitted[r].size() <= static_cast<size_t>(book_size[r])
                         ? admitted[r]
                         : std::vector<int>(admitted[r].begin(), admitted[r].begin() + book_size[r]);
    }
    q.books[r] = fits[r].book;
  }

  q.codes.assign(n, 0);
  q.scales.assign(rows * gcols, 0.0f);
  q.tile_error.assign(tiles, 0.0);
  std::vector<detail::BookTable> tables;
  for (size_t r = 0; r < rungs; ++r) tables.emplace_back(as_floats(q.books[r]));
  parallel_for(tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const RungFit& fit = fits[rung_of[t]];
      const detail::BookTable& table = tables[rung_of[t]];
      const int64_t c0 = (t % gcols) * grid.tile_cols, width = std::min(grid.tile_cols, cols - c0);
      for (int64_t k = layout.begin[t]; k < layout.begin[t + 1]; ++k) {
        const Segment& seg = layout.segments[k];
        const float scale = fit.scale[k];
        q.tile_error[t] += fit.error[k];
        for (int64_t r = seg.row; r < seg.row + seg.rows; ++r) {
          q.scales[r * gcols + t % gcols] = scale;
          for (int64_t c = c0; c < c0 + width; ++c) {
            const float x = dense[r * cols + c];
            q.codes[r * cols + c] =
                scale == 0.0f ? 0 : static_cast<int8_t>(table.values()[table.nearest(x / scale)]);
          }
        }
      }
    }
  });

  size_t largest = 1;
  for (const auto& book : q.books) largest = std::max(largest, book.size());
  q.uniform_bits = std::max(2, code_bits(largest));
  q.uniform_histogram = rtn_histogram(w, rows, cols, q.uniform_bits, grid.tile_cols, bits);
  q.w8a8_histogram = rtn_histogram(w, rows, cols, 8, cols, 8);
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

double stored_bits(const Quantized& q) {
  const TileGrid& grid = q.grid;
  const double numel = static_cast<double>(grid.rows) * grid.cols;
  double bits = 0;
  std::vector<char> used(q.books.size(), 0);
  for (int64_t t = 0; t < grid.count(); ++t) {
    const size_t rung = static_cast<size_t>(std::find(q.ladder.begin(), q.ladder.end(), q.plan.point[t]) -
                                            q.ladder.begin());
    used[rung] = 1;
    bits += static_cast<double>(grid.tile_size(t)) * code_bits(q.books[rung].size());
  }
  if (q.grid_mode == GridMode::subset) {  // each used book's INT8 table
    for (size_t r = 0; r < q.books.size(); ++r) bits += used[r] ? 8.0 * q.books[r].size() : 0.0;
  }
  bits += 32.0 * (q.channel_scales ? static_cast<double>(grid.rows) * grid.grid_cols() : static_cast<double>(grid.count()));
  const double nnz = static_cast<double>(q.sparse.values.size());
  // CSR: fp32 value and a column index per kept weight, a count per row (16-bit up to 65,536 columns).
  const double index_bits = grid.cols <= 65536 ? 16.0 : 32.0;
  if (nnz > 0) bits += nnz * ((q.sparse_fp16 ? 16.0 : 32.0) + index_bits) + index_bits * grid.rows;
  return bits / numel;
}

}  // namespace halo::hwq
