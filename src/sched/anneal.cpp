#include "src/sched/anneal.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>

namespace halo::sched {

namespace {

struct SplitMix {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }
  size_t below(size_t n) { return size_t(next() % n); }
};

}  // namespace

void anneal(const std::vector<Group>& groups, const std::vector<Device>& devices, std::vector<int32_t>& device_of,
            double budget, uint64_t seed, int64_t iterations) {
  const size_t G = groups.size(), D = devices.size();
  if (G < 2 || D < 2 || iterations <= 0) return;
  std::vector<double> cost(G * D);
  for (size_t g = 0; g < G; ++g)
    for (size_t d = 0; d < D; ++d) cost[g * D + d] = group_time(groups[g], devices[d]);
  std::vector<double> time(D, 0.0), used(D, 0.0);
  std::vector<int32_t> count(D, 0);
  double loss = 0;
  for (size_t g = 0; g < G; ++g) {
    const size_t d = size_t(device_of[g]);
    time[d] += cost[g * D + d];
    used[d] += groups[g].weight_bytes;
    ++count[d];
    loss += groups[g].importance * devices[d].plr;
  }
  auto span_of = [&](size_t d, double t, int32_t n) { return n > 0 ? t + devices[d].latency : 0.0; };
  auto makespan = [&] {
    double m = 0;
    for (size_t d = 0; d < D; ++d) m = std::max(m, span_of(d, time[d], count[d]));
    return m;
  };
  const double start = makespan();
  if (!(start > 0)) return;
  const double limit = budget * (1 + 1e-12);
  auto feasible = [&](double l) { return l <= limit; };
  // The loss budget is a penalty during the walk (growing from mild to stiff), so the
  // search can cross briefly infeasible placements that a hard constraint walls off;
  // only placements within the budget are kept as results.
  double total = 0, worst_plr = 0;
  for (const Group& g : groups) total += g.importance;
  for (const Device& d : devices) worst_plr = std::max(worst_plr, d.plr);
  const bool budgeted = std::isfinite(budget);
  const double unit = budget > 0 ? budget : std::max(total * worst_plr * 1e-3, 1e-300);
  auto penalty = [&](double l, double mu) { return budgeted && l > budget ? mu * (l - budget) / unit : 0.0; };
  // Surrogate objective: the L_p norm of the device times (p = 12, times scaled by
  // the start's makespan). It approaches the makespan but, unlike it, also rewards
  // relieving the second-slowest device, so the search does not wander on plateaus.
  constexpr double p = 12;
  const double scale = 1.0 / start;
  auto term = [&](size_t d, double t, int32_t n) { return std::pow(span_of(d, t, n) * scale, p); };
  std::vector<double> terms(D);
  double sum = 0;
  auto recompute = [&] {
    sum = 0;
    for (size_t d = 0; d < D; ++d) sum += terms[d] = term(d, time[d], count[d]);
  };
  recompute();
  std::vector<int32_t> best = device_of;
  double best_span = start;
  bool best_feasible = feasible(loss);
  SplitMix rng{seed ^ 0xD1B54A32D192ED03ull};
  const double t0 = 0.03, t1 = 1e-5, mu0 = 0.05, mu1 = 20.0;
  const double cool = std::pow(t1 / t0, 1.0 / double(iterations));
  const double stiffen = std::pow(mu1 / mu0, 1.0 / double(iterations));
  double temperature = t0, mu = mu0;
  for (int64_t it = 0; it < iterations; ++it) {
    temperature *= cool;
    mu *= stiffen;
    if ((it & 1023) == 0) recompute();  // no drift from the running sum
    const double before = std::pow(sum, 1.0 / p);
    const size_t g = rng.below(G), a = size_t(device_of[g]);
    const bool swap = rng.uniform() < 0.4;
    size_t h = G, b;
    double dl, ta, tb, ua, ub;
    int32_t na = count[a], nb;
    if (swap) {
      h = rng.below(G);
      b = size_t(device_of[h]);
      if (b == a) continue;
      dl = (groups[g].importance - groups[h].importance) * (devices[b].plr - devices[a].plr);
      ta = time[a] - cost[g * D + a] + cost[h * D + a];
      tb = time[b] - cost[h * D + b] + cost[g * D + b];
      ua = used[a] - groups[g].weight_bytes + groups[h].weight_bytes;
      ub = used[b] - groups[h].weight_bytes + groups[g].weight_bytes;
      nb = count[b];
    } else {
      b = rng.below(D - 1);
      b += b >= a;
      dl = groups[g].importance * (devices[b].plr - devices[a].plr);
      ta = time[a] - cost[g * D + a];
      tb = time[b] + cost[g * D + b];
      ua = used[a] - groups[g].weight_bytes;
      ub = used[b] + groups[g].weight_bytes;
      na = count[a] - 1;
      nb = count[b] + 1;
    }
    if (ua > devices[a].capacity_bytes || ub > devices[b].capacity_bytes) continue;
    const double ea = term(a, ta, na), eb = term(b, tb, nb);
    const double after_sum = sum - terms[a] - terms[b] + ea + eb;
    const double delta = std::pow(std::max(after_sum, 0.0), 1.0 / p) - before + penalty(loss + dl, mu) -
                         penalty(loss, mu);
    if (delta > 0 && rng.uniform() >= std::exp(-delta / temperature)) continue;
    time[a] = ta, time[b] = tb, used[a] = ua, used[b] = ub, count[a] = na, count[b] = nb;
    terms[a] = ea, terms[b] = eb, sum = after_sum;
    loss += dl;
    device_of[g] = int32_t(b);
    if (swap) device_of[h] = int32_t(a);
    if (feasible(loss)) {
      const double m = makespan();
      if (!best_feasible || m < best_span * (1 - 1e-12)) best = device_of, best_span = m, best_feasible = true;
    }
  }
  device_of = best;
}

void pair_exact(const std::vector<Group>& groups, const std::vector<Device>& devices, std::vector<int32_t>& device_of,
                double budget, int32_t max_groups) {
  const size_t G = groups.size(), D = devices.size();
  if (D < 2) return;
  const double limit = budget * (1 + 1e-12);
  std::vector<double> time(D, 0.0), used(D, 0.0);
  std::vector<int32_t> count(D, 0);
  double loss = 0;
  for (size_t g = 0; g < G; ++g) {
    const size_t d = size_t(device_of[g]);
    time[d] += group_time(groups[g], devices[d]);
    used[d] += groups[g].weight_bytes;
    ++count[d];
    loss += groups[g].importance * devices[d].plr;
  }
  auto span = [&](size_t d, double t, int32_t n) { return n > 0 ? t + devices[d].latency : 0.0; };
  for (int round = 0; round < 4 * int(D); ++round) {
    size_t worst = 0;
    for (size_t d = 1; d < D; ++d)
      if (span(d, time[d], count[d]) > span(worst, time[worst], count[worst])) worst = d;
    const double current = span(worst, time[worst], count[worst]);
    bool improved = false;
    for (size_t other = 0; other < D && !improved; ++other) {
      if (other == worst) continue;
      const size_t a = worst, b = other;
      std::vector<int32_t> members;
      for (size_t g = 0; g < G; ++g)
        if (size_t(device_of[g]) == a || size_t(device_of[g]) == b) members.push_back(int32_t(g));
      if (members.empty() || members.size() > size_t(max_groups)) continue;
      // Enumerate every split of the pair's groups in Gray-code order (one group moves per step).
      const size_t k = members.size();
      double ta = 0, tb = 0, ua = 0, ub = 0, l = loss;
      int32_t na = 0, nb = 0;
      std::vector<uint8_t> on_b(k, 0);
      for (size_t i = 0; i < k; ++i) {  // start: everything on a
        const Group& g = groups[members[i]];
        ta += group_time(g, devices[a]);
        ua += g.weight_bytes;
        ++na;
        if (size_t(device_of[members[i]]) == b) l += g.importance * (devices[a].plr - devices[b].plr);
      }
      double best = current * (1 - 1e-9);
      uint64_t best_code = UINT64_MAX;
      uint64_t code = 0;
      for (uint64_t step = 1; step <= (uint64_t(1) << k); ++step) {
        if (ua <= devices[a].capacity_bytes && ub <= devices[b].capacity_bytes && l <= limit) {
          const double m = std::max(span(a, ta, na), span(b, tb, nb));
          if (m < best) best = m, best_code = code;
        }
        if (step == (uint64_t(1) << k)) break;
        const size_t i = size_t(__builtin_ctzll(step));
        const Group& g = groups[members[i]];
        const double sign = on_b[i] ? -1.0 : 1.0;  // +1: a -> b
        ta -= sign * group_time(g, devices[a]);
        tb += sign * group_time(g, devices[b]);
        ua -= sign * g.weight_bytes;
        ub += sign * g.weight_bytes;
        na -= on_b[i] ? -1 : 1;
        nb += on_b[i] ? -1 : 1;
        l += sign * g.importance * (devices[b].plr - devices[a].plr);
        on_b[i] ^= 1;
        code ^= uint64_t(1) << i;
      }
      if (best_code == UINT64_MAX) continue;
      for (size_t i = 0; i < k; ++i) {
        const int32_t g = members[i];
        const size_t from = size_t(device_of[g]), to = (best_code >> i) & 1 ? b : a;
        if (from == to) continue;
        time[from] -= group_time(groups[g], devices[from]);
        time[to] += group_time(groups[g], devices[to]);
        used[from] -= groups[g].weight_bytes;
        used[to] += groups[g].weight_bytes;
        --count[from];
        ++count[to];
        loss += groups[g].importance * (devices[to].plr - devices[from].plr);
        device_of[g] = int32_t(to);
      }
      improved = true;
    }
    if (!improved) return;
  }
}

namespace {

// Depth-first branch and bound over group -> device choices (see exact_search).
struct Search {
  const std::vector<Group>& groups;
  const std::vector<Device>& devices;
  std::vector<double> cost;       // g * D + d
  std::vector<int32_t> order;     // groups, longest first
  std::vector<double> rest_min;   // from position i on: sum of each group's cheapest time
  std::vector<double> rest_loss;  // from position i on: least loss they can still add
  double limit, best_span;
  std::vector<int32_t> assign, best;
  std::vector<double> time, used;
  std::vector<int32_t> count;
  int64_t nodes = 0, node_cap;
  size_t D;

  double span(size_t d, double t, int32_t n) const { return n > 0 ? t + devices[d].latency : 0.0; }

  void dive(size_t i, double loss) {
    if (++nodes > node_cap) return;
    if (i == order.size()) {
      double m = 0;
      for (size_t d = 0; d < D; ++d) m = std::max(m, span(d, time[d], count[d]));
      if (m < best_span) best_span = m, best = assign;
      return;
    }
    if (loss + rest_loss[i] > limit) return;
    // The room left under the incumbent on all devices must hold the remaining work.
    double room = 0;
    for (size_t d = 0; d < D; ++d) room += std::max(0.0, best_span - time[d] - devices[d].latency);
    if (rest_min[i] >= room) return;
    const int32_t g = order[i];
    // Devices in order of the time they would reach with this group.
    std::vector<std::pair<double, size_t>> choice;
    for (size_t d = 0; d < D; ++d) {
      const double t = span(d, time[d] + cost[size_t(g) * D + d], count[d] + 1);
      if (t >= best_span || used[d] + groups[g].weight_bytes > devices[d].capacity_bytes) continue;
      const double l = loss + groups[g].importance * devices[d].plr;
      if (l + rest_loss[i + 1] > limit) continue;
      choice.emplace_back(t, d);
    }
    std::sort(choice.begin(), choice.end());
    for (const auto& [t, d] : choice) {
      if (t >= best_span) break;
      time[d] += cost[size_t(g) * D + d];
      used[d] += groups[g].weight_bytes;
      ++count[d];
      assign[g] = int32_t(d);
      dive(i + 1, loss + groups[g].importance * devices[d].plr);
      time[d] -= cost[size_t(g) * D + d];
      used[d] -= groups[g].weight_bytes;
      --count[d];
      if (nodes > node_cap) return;
    }
  }
};

}  // namespace

bool exact_search(const std::vector<Group>& groups, const std::vector<Device>& devices, std::vector<int32_t>& device_of,
                  double budget, int64_t node_cap, const std::vector<int32_t>* free) {
  const size_t G = groups.size(), D = devices.size();
  Search s{groups, devices, {}, {}, {}, {}, budget * (1 + 1e-12), 0.0, {}, {}, {}, {}, {}, 0, node_cap, D};
  s.cost.resize(G * D);
  std::vector<double> fastest(G, std::numeric_limits<double>::infinity());
  for (size_t g = 0; g < G; ++g)
    for (size_t d = 0; d < D; ++d) {
      s.cost[g * D + d] = group_time(groups[g], devices[d]);
      fastest[g] = std::min(fastest[g], s.cost[g * D + d]);
    }
  s.assign = device_of;
  s.time.assign(D, 0.0);
  s.used.assign(D, 0.0);
  s.count.assign(D, 0);
  double fixed_loss = 0;
  if (free != nullptr) {
    s.order = *free;
    std::vector<uint8_t> is_free(G, 0);
    for (int32_t g : s.order) is_free[g] = 1;
    for (size_t g = 0; g < G; ++g) {
      if (is_free[g]) continue;
      const size_t d = size_t(device_of[g]);
      s.time[d] += s.cost[g * D + d];
      s.used[d] += groups[g].weight_bytes;
      ++s.count[d];
      fixed_loss += groups[g].importance * devices[d].plr;
    }
  } else {
    s.order.resize(G);
    std::iota(s.order.begin(), s.order.end(), 0);
  }
  // Most important first: their placement decides the loss budget, so infeasible
  // branches die near the root; then the longest.
  std::stable_sort(s.order.begin(), s.order.end(), [&](int32_t a, int32_t b) {
    return groups[a].importance != groups[b].importance ? groups[a].importance > groups[b].importance
                                                        : fastest[a] > fastest[b];
  });
  double min_plr = 1.0;
  for (const Device& d : devices) min_plr = std::min(min_plr, d.plr);
  const size_t n = s.order.size();
  s.rest_min.assign(n + 1, 0.0);
  s.rest_loss.assign(n + 1, 0.0);
  for (size_t i = n; i-- > 0;) {
    s.rest_min[i] = s.rest_min[i + 1] + fastest[s.order[i]];
    s.rest_loss[i] = s.rest_loss[i + 1] + groups[s.order[i]].importance * min_plr;
  }
  s.best = device_of;
  s.best_span = evaluate(groups, devices, device_of).makespan * (1 - 1e-9);
  const double start = s.best_span;
  s.dive(0, fixed_loss);
  if (s.best_span < start) device_of = s.best;
  return s.nodes <= node_cap;
}

void large_neighbourhood(const std::vector<Group>& groups, const std::vector<Device>& devices,
                         std::vector<int32_t>& device_of, double budget, uint64_t seed, int32_t rounds,
                         int32_t subset, int64_t node_cap) {
  const size_t G = groups.size(), D = devices.size();
  if (G < 2 || D < 2) return;
  SplitMix rng{seed ^ 0x94D049BB133111EBull};
  const size_t k = std::min<size_t>(size_t(subset), G);
  for (int32_t r = 0; r < rounds; ++r) {
    const Plan now = evaluate(groups, devices, device_of);
    size_t slowest = 0, idlest = 0;
    for (size_t d = 1; d < D; ++d) {
      if (now.device_time[d] > now.device_time[slowest]) slowest = d;
      if (now.device_time[d] < now.device_time[idlest]) idlest = d;
    }
    // Even rounds: a third of the subset from the slowest device, a third from the
    // idlest, the rest anywhere; odd rounds: half from the slowest, half anywhere.
    // Either way room for chains of moves that trade loss budget between devices.
    std::vector<int32_t> pick, pool[3];
    for (size_t g = 0; g < G; ++g) {
      const size_t d = size_t(device_of[g]);
      pool[d == slowest ? 0 : d == idlest ? 1 : 2].push_back(int32_t(g));
    }
    auto take = [&](std::vector<int32_t>& from, size_t count) {
      for (size_t t = 0; t < count && !from.empty(); ++t) {
        const size_t i = rng.below(from.size());
        pick.push_back(from[i]);
        from.erase(from.begin() + std::ptrdiff_t(i));
      }
    };
    // Odd rounds: half from the slowest and none from the idlest in particular.
    take(pool[0], r % 2 ? k / 2 : (k + 2) / 3);
    take(pool[1], r % 2 ? 0 : k / 3);
    pool[2].insert(pool[2].end(), pool[0].begin(), pool[0].end());
    pool[2].insert(pool[2].end(), pool[1].begin(), pool[1].end());
    take(pool[2], k - pick.size());
    exact_search(groups, devices, device_of, budget, node_cap, &pick);
  }
}

}  // namespace halo::sched
