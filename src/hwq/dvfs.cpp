// DVFS plan by dynamic programming, and the latency/energy estimate.
#include "halo/hwq/dvfs.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "halo/core/error.hpp"
#include "halo/hwq/quantizer.hpp"

namespace halo::hwq {

double compute_ns(const HardwareModel& model, double macs, int point) {
  const double cycles = macs / (static_cast<double>(model.array_rows) * model.array_cols);
  return cycles / model.points[point].frequency_ghz;
}

namespace {

// Points along a fixed order: wanted[t] and macs[t] are in execution order.
Plan plan_in_order(const std::vector<int>& wanted, const std::vector<int64_t>& macs, const HardwareModel& model,
                   int max_switches) {
  const char* fn = "plan_dvfs";
  require(wanted.size() == macs.size(), fn, "wanted has ", wanted.size(), " tiles but macs has ", macs.size());
  require(max_switches >= 0, fn, "max_switches must be >= 0, got ", max_switches);
  const int num_points = static_cast<int>(model.points.size());
  const int64_t num_tiles = static_cast<int64_t>(wanted.size());
  Plan plan;
  if (num_tiles == 0) return plan;
  int64_t runs = 1;
  for (int64_t t = 0; t < num_tiles; ++t) {
    require(wanted[t] >= 0 && wanted[t] < num_points, fn, "tile ", t, " wants point ", wanted[t], " of ",
            num_points);
    if (t > 0 && wanted[t] != wanted[t - 1]) ++runs;
  }
  // An optimal plan never switches inside a run of equal wanted points, so runs - 1 switches suffice.
  const int64_t budget = std::min<int64_t>(max_switches, runs - 1);
  const int64_t states = (budget + 1) * num_points;
  require(static_cast<double>(num_tiles) * states <= 2e8, fn, "max_switches ", max_switches, " is too large to plan ",
          num_tiles, " tiles");
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> cost(states, inf), next(states, inf);
  std::vector<int32_t> from(num_tiles * states, -1);  // previous state of each (tile, state)
  auto index = [&](int64_t used, int point) { return used * num_points + point; };
  for (int p = 0; p <= wanted[0]; ++p) cost[index(0, p)] = compute_ns(model, macs[0], p);
  for (int64_t t = 1; t < num_tiles; ++t) {
    std::fill(next.begin(), next.end(), inf);
    for (int64_t used = 0; used <= budget; ++used) {
      for (int p = 0; p < num_points; ++p) {
        const double here = cost[index(used, p)];
        if (here == inf) continue;
        for (int q = 0; q <= wanted[t]; ++q) {
          const int64_t after = used + (q != p);
          if (after > budget) continue;
          const double total = here + compute_ns(model, macs[t], q) + (q != p ? model.switch_cost_ns : 0.0);
          if (total < next[index(after, q)]) {
            next[index(after, q)] = total;
            from[t * states + index(after, q)] = static_cast<int32_t>(index(used, p));
          }
        }
      }
    }
    std::swap(cost, next);
  }
  const int64_t best = std::min_element(cost.begin(), cost.end()) - cost.begin();
  plan.point.assign(num_tiles, 0);
  int64_t state = best;
  for (int64_t t = num_tiles - 1; t >= 0; --t) {
    plan.point[t] = static_cast<int>(state % num_points);
    if (t > 0) state = from[t * states + state];
  }
  for (int64_t t = 1; t < num_tiles; ++t) plan.switches += plan.point[t] != plan.point[t - 1];
  return plan;
}

}  // namespace

Plan plan_dvfs(const std::vector<int>& wanted, const std::vector<int64_t>& macs, const HardwareModel& model,
               int max_switches) {
  const char* fn = "plan_dvfs";
  require(wanted.size() == macs.size(), fn, "wanted has ", wanted.size(), " tiles but macs has ", macs.size());
  const int64_t num_tiles = static_cast<int64_t>(wanted.size());
  std::vector<int64_t> order(num_tiles);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return wanted[a] > wanted[b]; });
  std::vector<int> wanted_in_order(num_tiles);
  std::vector<int64_t> macs_in_order(num_tiles);
  for (int64_t i = 0; i < num_tiles; ++i) {
    wanted_in_order[i] = wanted[order[i]];
    macs_in_order[i] = macs[order[i]];
  }
  const Plan in_order = plan_in_order(wanted_in_order, macs_in_order, model, max_switches);
  Plan plan;
  plan.order = order;
  plan.switches = in_order.switches;
  plan.point.assign(num_tiles, 0);
  for (int64_t i = 0; i < num_tiles; ++i) plan.point[order[i]] = in_order.point[i];
  return plan;
}

Estimate estimate(const Quantized& q, const HardwareModel& model) {
  const TileGrid& grid = q.grid;
  const double tokens = static_cast<double>(q.tokens);
  Estimate e;
  int nominal = model.nominal_point(q.bits);
  if (nominal < 0) nominal = 0;  // no point admits the whole grid: the slowest is the best a uniform grid can do
  const auto power = [&](int point) { return model.points[point].power_w + model.static_power_w; };
  double code_bits = 0;
  for (int64_t t = 0; t < grid.count(); ++t) {
    const double macs = static_cast<double>(grid.tile_size(t)) * tokens;
    const int point = q.plan.point[t];
    const double ns = compute_ns(model, macs, point);
    e.latency_ns += ns;
    e.energy_nj += ns * power(point);  // W * ns = nJ
    const double base_ns = compute_ns(model, macs, nominal);
    e.baseline_latency_ns += base_ns;
    e.baseline_energy_nj += base_ns * power(nominal);
    const size_t book = model.code_book(q.bits, point).size();
    code_bits += static_cast<double>(grid.tile_size(t)) * std::ceil(std::log2(static_cast<double>(book)));
  }
  e.latency_ns += q.plan.switches * model.switch_cost_ns;
  e.energy_nj += q.plan.switches * model.switch_energy_nj;
  // The full-precision side part runs after the tiles on the sparse unit, at the slowest point.
  const double sparse_ns = static_cast<double>(q.sparse.values.size()) * tokens / model.sparse_macs_per_cycle /
                           model.points[0].frequency_ghz;
  e.latency_ns += sparse_ns;
  e.energy_nj += sparse_ns * power(0);
  e.speedup = e.baseline_latency_ns / e.latency_ns;
  e.energy_saving = 1.0 - e.energy_nj / e.baseline_energy_nj;
  const double numel = static_cast<double>(grid.rows) * grid.cols;
  const double scale_count = q.channel_scales ? static_cast<double>(grid.rows) * grid.grid_cols()
                                              : static_cast<double>(grid.count());
  const double sparse_bits = static_cast<double>(q.sparse.values.size()) * 64.0 + (grid.rows + 1) * 64.0;
  e.average_bits = (code_bits + scale_count * 32.0 + sparse_bits) / numel;
  e.baseline_bits = q.bits + 32.0 * grid.rows * grid.grid_cols() / numel;
  return e;
}

}  // namespace halo::hwq
