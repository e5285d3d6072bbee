// DVFS plan by dynamic programming over a ladder of points, and the latency/energy estimate with baselines.
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

// Rungs along a fixed order: wanted[t] is in execution order, cost[t * rungs + r] the cost of tile t at rung r.
std::vector<int> plan_in_order(const std::vector<int>& wanted, const std::vector<double>& cost, int rungs,
                               double switch_cost, int max_switches, int& switches) {
  const char* fn = "plan_dvfs";
  const int64_t num_tiles = static_cast<int64_t>(wanted.size());
  switches = 0;
  if (num_tiles == 0) return {};
  int64_t runs = 1;
  for (int64_t t = 1; t < num_tiles; ++t) runs += wanted[t] != wanted[t - 1];
  // An optimal plan never switches inside a run of equal wanted rungs, so runs - 1 switches suffice.
  const int64_t budget = std::min<int64_t>(max_switches, runs - 1);
  const int64_t states = (budget + 1) * rungs;
  require(static_cast<double>(num_tiles) * states <= 2e8, fn, "max_switches ", max_switches, " is too large to plan ",
          num_tiles, " tiles");
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> best(states, inf), next(states, inf);
  std::vector<int32_t> from(num_tiles * states, -1);  // previous state of each (tile, state)
  auto index = [&](int64_t used, int rung) { return used * rungs + rung; };
  for (int r = 0; r <= wanted[0]; ++r) best[index(0, r)] = cost[r];
  for (int64_t t = 1; t < num_tiles; ++t) {
    std::fill(next.begin(), next.end(), inf);
    for (int64_t used = 0; used <= budget; ++used) {
      for (int p = 0; p < rungs; ++p) {
        const double here = best[index(used, p)];
        if (here == inf) continue;
        for (int r = 0; r <= wanted[t]; ++r) {
          const int64_t after = used + (r != p);
          if (after > budget) continue;
          const double total = here + cost[t * rungs + r] + (r != p ? switch_cost : 0.0);
          if (total < next[index(after, r)]) {
            next[index(after, r)] = total;
            from[t * states + index(after, r)] = static_cast<int32_t>(index(used, p));
          }
        }
      }
    }
    std::swap(best, next);
  }
  const int64_t last = std::min_element(best.begin(), best.end()) - best.begin();
  std::vector<int> rung(num_tiles, 0);
  int64_t state = last;
  for (int64_t t = num_tiles - 1; t >= 0; --t) {
    rung[t] = static_cast<int>(state % rungs);
    if (t > 0) state = from[t * states + state];
  }
  for (int64_t t = 1; t < num_tiles; ++t) switches += rung[t] != rung[t - 1];
  return rung;
}

double mean_energy_pj(const HardwareModel& model, int bits) {
  const auto& table = model.energies(bits);
  return std::accumulate(table.begin(), table.end(), 0.0) / static_cast<double>(table.size());
}

}  // namespace

Plan plan_dvfs(const std::vector<int>& wanted, const std::vector<int64_t>& macs, const HardwareModel& model,
               int max_switches, Mode mode, int bits) {
  const char* fn = "plan_dvfs";
  require(wanted.size() == macs.size(), fn, "wanted has ", wanted.size(), " tiles but macs has ", macs.size());
  require(max_switches >= 0, fn, "max_switches must be >= 0, got ", max_switches);
  require(bits == 4 || bits == 8, fn, "bits must be 4 or 8, got ", bits);
  const std::vector<int> ladder = model.ladder(mode, bits);
  const int rungs = static_cast<int>(ladder.size());
  const int64_t num_tiles = static_cast<int64_t>(wanted.size());
  for (int64_t t = 0; t < num_tiles; ++t) {
    require(wanted[t] >= 0 && wanted[t] < rungs, fn, "tile ", t, " wants rung ", wanted[t], " of a ", rungs,
            "-rung ladder");
    require(macs[t] >= 0, fn, "tile ", t, " has negative macs ", macs[t]);
  }
  std::vector<int64_t> order(num_tiles);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return wanted[a] > wanted[b]; });
  // Performance: time; energy mode: V^2-scaled mean MAC energy plus leakage over the tile's time (a proxy:
  // the codes are not known yet).
  const double mean_pj = mean_energy_pj(model, bits);
  std::vector<int> wanted_in_order(num_tiles);
  std::vector<double> cost(num_tiles * rungs);
  for (int64_t i = 0; i < num_tiles; ++i) {
    const int64_t t = order[i];
    wanted_in_order[i] = wanted[t];
    for (int r = 0; r < rungs; ++r) {
      const OperatingPoint& point = model.points[ladder[r]];
      const double ns = compute_ns(model, static_cast<double>(macs[t]), ladder[r]);
      cost[i * rungs + r] = mode == Mode::performance
                                ? ns
                                : 1e-3 * macs[t] * mean_pj * point.voltage * point.voltage + point.leakage_w * ns;
    }
  }
  const double switch_cost = mode == Mode::performance ? model.switch_cost_ns : model.switch_energy_nj;
  Plan plan;
  const std::vector<int> rung = plan_in_order(wanted_in_order, cost, rungs, switch_cost, max_switches, plan.switches);
  plan.order = order;
  plan.point.assign(num_tiles, 0);
  for (int64_t i = 0; i < num_tiles; ++i) plan.point[order[i]] = ladder[rung[i]];
  return plan;
}

namespace {

// Energy of one pass over `counts` codes (index value + 2^(bits-1)) at points[point], activity model, nJ.
double histogram_nj(const HardwareModel& model, int bits, const std::vector<int64_t>& counts, int point,
                    double tokens) {
  const auto& table = model.energies(bits);
  double pj = 0;
  for (size_t i = 0; i < counts.size(); ++i) pj += static_cast<double>(counts[i]) * table[i];
  const double volts = model.points[point].voltage;
  return 1e-3 * pj * volts * volts * tokens;
}

// A baseline running every weight at the nominal point: compute, memory, and the energy terms.
Cost baseline_cost(const HardwareModel& model, double numel, double tokens, double bits, int nominal,
                   double dynamic_nj) {
  Cost c;
  c.bits = bits;
  c.compute_ns = compute_ns(model, numel * tokens, nominal);
  const double bytes = numel * bits / 8.0;
  c.memory_ns = model.memory.bandwidth_gbps > 0 ? bytes / model.memory.bandwidth_gbps : 0.0;
  c.latency_ns = std::max(c.compute_ns, c.memory_ns);
  if (model.energy_model == EnergyModel::power) {
    c.dynamic_nj = c.compute_ns * model.points[nominal].power_w;
  } else {
    c.dynamic_nj = dynamic_nj;
    c.leakage_nj = c.latency_ns * model.points[nominal].leakage_w;
  }
  c.memory_nj = 1e-3 * bytes * model.memory.energy_pj_per_byte;
  c.static_nj = c.latency_ns * model.static_power_w;
  c.energy_nj = c.dynamic_nj + c.leakage_nj + c.memory_nj + c.static_nj;
  return c;
}

}  // namespace

Estimate estimate(const Quantized& q, const HardwareModel& model, int64_t tokens_override) {
  const char* fn = "estimate";
  require(tokens_override >= 0, fn, "tokens must be >= 0, got ", tokens_override);
  const TileGrid& grid = q.grid;
  require(q.plan.point.size() == static_cast<size_t>(grid.count()), fn, "the plan covers ", q.plan.point.size(),
          " tiles but the grid has ", grid.count());
  for (int p : q.plan.point) {
    require(p >= 0 && p < static_cast<int>(model.points.size()), fn, "the plan uses point ", p, " but the model has ",
            model.points.size(), " points: price it with the model it was quantized for");
  }
  const double tokens = static_cast<double>(tokens_override > 0 ? tokens_override : q.tokens);
  const double numel = static_cast<double>(grid.rows) * grid.cols;
  const int bits = q.bits;
  Estimate e;
  e.tokens = static_cast<int64_t>(tokens);
  int nominal = model.nominal_point(bits);
  if (nominal < 0) nominal = 0;
  e.nominal_point = nominal;
  const bool activity = model.energy_model == EnergyModel::activity;
  const auto& table = model.energies(bits);
  const int offset = 1 << (bits - 1);
  const int64_t gcols = grid.grid_cols();

  // Dense tiles at their points.
  double dense_ns = 0, dynamic_nj = 0, leakage_nj = 0, point_time_leak = 0;
  for (int64_t t = 0; t < grid.count(); ++t) {
    const int point = q.plan.point[t];
    const double ns = compute_ns(model, static_cast<double>(grid.tile_size(t)) * tokens, point);
    dense_ns += ns;
    if (activity) {
      const int64_t r0 = (t / gcols) * grid.tile_rows, c0 = (t % gcols) * grid.tile_cols;
      const int64_t r1 = std::min(grid.rows, r0 + grid.tile_rows), c1 = std::min(grid.cols, c0 + grid.tile_cols);
      double pj = 0;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) pj += table[q.codes[r * grid.cols + c] + offset];
      }
      const double volts = model.points[point].voltage;
      dynamic_nj += 1e-3 * pj * volts * volts * tokens;
      point_time_leak += ns * model.points[point].leakage_w;
    } else {
      dynamic_nj += ns * model.points[point].power_w;
    }
  }
  leakage_nj = point_time_leak;
  e.switch_ns = q.plan.switches * model.switch_cost_ns;
  e.switch_nj = q.plan.switches * model.switch_energy_nj;

  // The sparse engine runs beside the array at the lowest-voltage point that keeps up with it (the fastest
  // point when none does).
  const double nnz = static_cast<double>(q.sparse.values.size());
  const double dense_total = dense_ns + e.switch_ns;
  int sparse_point = -1;
  if (nnz > 0) {
    for (int p = 0; p < static_cast<int>(model.points.size()); ++p) {
      const double ns = nnz * tokens / model.sparse.macs_per_cycle / model.points[p].frequency_ghz;
      if (ns <= dense_total && (sparse_point < 0 || model.points[p].voltage < model.points[sparse_point].voltage)) {
        sparse_point = p;
      }
    }
    if (sparse_point < 0) sparse_point = static_cast<int>(model.points.size()) - 1;
    const OperatingPoint& sp = model.points[sparse_point];
    e.sparse_ns = nnz * tokens / model.sparse.macs_per_cycle / sp.frequency_ghz;
    e.sparse_nj = activity ? 1e-3 * nnz * tokens * model.sparse.mac_energy_pj * sp.voltage * sp.voltage
                           : e.sparse_ns * sp.power_w;
  }
  e.sparse_point = std::max(sparse_point, 0);

  Cost& h = e.halo;
  h.bits = stored_bits(q);
  h.compute_ns = dense_total;
  const double bytes = numel * h.bits / 8.0;
  h.memory_ns = model.memory.bandwidth_gbps > 0 ? bytes / model.memory.bandwidth_gbps : 0.0;
  h.latency_ns = std::max({h.compute_ns, e.sparse_ns, h.memory_ns});
  if (activity) {  // the array idles (waiting for memory or the sparse engine) at the nominal point
    leakage_nj += std::max(0.0, h.latency_ns - dense_ns) * model.points[nominal].leakage_w;
  }
  h.dynamic_nj = dynamic_nj;
  h.leakage_nj = leakage_nj;
  h.memory_nj = 1e-3 * bytes * model.memory.energy_pj_per_byte;
  h.static_nj = h.latency_ns * model.static_power_w;
  h.energy_nj = h.dynamic_nj + h.leakage_nj + h.memory_nj + h.static_nj + e.switch_nj + e.sparse_nj;

  const double scale_bits = 32.0 * grid.rows * gcols / numel;
  e.uniform = baseline_cost(model, numel, tokens, q.uniform_bits + scale_bits, nominal,
                            histogram_nj(model, bits, q.uniform_histogram, nominal, tokens));
  e.w8a8 = baseline_cost(model, numel, tokens, 8.0 + 32.0 / grid.cols, nominal,
                         histogram_nj(model, 8, q.w8a8_histogram, nominal, tokens));
  const double volts = model.points[nominal].voltage;
  e.fp16 = baseline_cost(model, numel, tokens, 16.0, nominal, 1e-3 * numel * tokens * model.fp16_mac_pj * volts * volts);

  e.latency_ns = h.latency_ns;
  e.energy_nj = h.energy_nj;
  e.baseline_latency_ns = e.uniform.latency_ns;
  e.baseline_energy_nj = e.uniform.energy_nj;
  e.speedup = e.uniform.latency_ns / h.latency_ns;
  e.energy_saving = 1.0 - h.energy_nj / e.uniform.energy_nj;
  e.average_bits = h.bits;
  e.baseline_bits = e.uniform.bits;
  return e;
}

}  // namespace halo::hwq
