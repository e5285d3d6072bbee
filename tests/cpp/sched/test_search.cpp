// The small-instance searches of the balancer against exhaustive enumeration.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>

#include "halo/sched/balance.hpp"
#include "src/sched/anneal.hpp"

using namespace halo::sched;

namespace {

struct Instance {
  std::vector<Group> groups;
  std::vector<Device> devices;
  double budget;
};

// Heterogeneous devices, heavy-tailed importance, PLR among 0..30 %, a tight budget, one
// device short of memory: the kind of instance the greedy starts get wrong.
Instance tiny(uint64_t seed, int G, int D) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(1.0, 10.0), s(1.0, 4.0);
  std::exponential_distribution<double> e(1.0);
  const double plrs[] = {0.0, 0.01, 0.05, 0.1, 0.3};
  Instance in;
  double total = 0;
  for (int g = 0; g < G; ++g) {
    const double heavy = std::exp(2.0 * e(rng)) - 0.9;  // heavy-tailed
    in.groups.push_back(Group{u(rng) * 1e6, u(rng) * 1e5, u(rng) * 1e3, 0.0, heavy});
    total += heavy;
  }
  for (int d = 0; d < D; ++d) {
    Device dev;
    dev.speed = s(rng) * 1e9;
    dev.bandwidth = s(rng) * 1e6;
    dev.latency = s(rng) * 1e-4;
    dev.plr = d == 0 ? 0.0 : plrs[rng() % 5];
    if (d == 1) dev.capacity_bytes = 3.5e5;
    in.devices.push_back(dev);
  }
  in.budget = 0.01 * total;
  return in;
}

// Exhaustive optimum (makespan) under budget and capacity; inf when nothing is feasible.
double brute_force(const Instance& in) {
  const size_t G = in.groups.size(), D = in.devices.size();
  std::vector<int32_t> place(G, 0);
  double best = std::numeric_limits<double>::infinity();
  while (true) {
    const Plan p = evaluate(in.groups, in.devices, place);
    std::vector<double> used(D, 0.0);
    for (size_t g = 0; g < G; ++g) used[place[g]] += in.groups[g].weight_bytes;
    bool fits = p.expected_loss <= in.budget * (1 + 1e-12);
    for (size_t d = 0; d < D; ++d) fits &= used[d] <= in.devices[d].capacity_bytes;
    if (fits) best = std::min(best, p.makespan);
    size_t i = 0;
    while (i < G && ++place[i] == int32_t(D)) place[i++] = 0;
    if (i == G) break;
  }
  return best;
}

void check_valid(const Instance& in, const std::vector<int32_t>& place) {
  const Plan p = evaluate(in.groups, in.devices, place);
  REQUIRE(p.expected_loss <= in.budget * (1 + 1e-9));
  std::vector<double> used(in.devices.size(), 0.0);
  for (size_t g = 0; g < place.size(); ++g) used[place[g]] += in.groups[g].weight_bytes;
  for (size_t d = 0; d < used.size(); ++d) REQUIRE(used[d] <= in.devices[d].capacity_bytes);
}

}  // namespace

TEST_CASE("exact search finds the exhaustive optimum on tiny instances") {
  for (uint64_t seed = 0; seed < 12; ++seed) {
    const Instance in = tiny(seed, 8, 3);
    const double optimum = brute_force(in);
    if (!std::isfinite(optimum)) continue;
    // Start from a feasible placement: everything on the lossless device 0.
    std::vector<int32_t> place(in.groups.size(), 0);
    REQUIRE(exact_search(in.groups, in.devices, place, in.budget, 10'000'000));
    check_valid(in, place);
    REQUIRE(evaluate(in.groups, in.devices, place).makespan == Approx(optimum).epsilon(1e-9));
  }
}

TEST_CASE("annealing, pair re-splits and neighbourhood search keep budget and capacity, never worsen") {
  for (uint64_t seed = 0; seed < 12; ++seed) {
    const Instance in = tiny(100 + seed, 9, 4);
    std::vector<int32_t> start(in.groups.size(), 0);
    const double before = evaluate(in.groups, in.devices, start).makespan;
    std::vector<int32_t> a = start, b = start, c = start;
    anneal(in.groups, in.devices, a, in.budget, seed, 20000);
    pair_exact(in.groups, in.devices, b, in.budget, 16);
    large_neighbourhood(in.groups, in.devices, c, in.budget, seed, 30, 5, 5000);
    for (const auto* place : {&a, &b, &c}) {
      check_valid(in, *place);
      REQUIRE(evaluate(in.groups, in.devices, *place).makespan <= before * (1 + 1e-12));
    }
  }
}

TEST_CASE("the balancer reaches the exhaustive optimum on tiny hard instances") {
  int solved = 0;
  for (uint64_t seed = 0; seed < 12; ++seed) {
    const Instance in = tiny(200 + seed, 9, 3);
    const double optimum = brute_force(in);
    if (!std::isfinite(optimum)) continue;
    const Plan p = balance(in.groups, in.devices, Policy::halo, 0.01);
    check_valid(in, p.device_of);
    REQUIRE(p.makespan <= optimum * 1.02);
    solved += p.makespan <= optimum * (1 + 1e-9);
  }
  REQUIRE(solved >= 6);
}
