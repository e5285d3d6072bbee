#include <catch2/catch.hpp>

#include <chrono>
#include <random>

#include "halo/core/error.hpp"
#include "halo/sched/balance.hpp"
#include "halo/sched/monitor.hpp"
#include "halo/sched/simulate.hpp"

using namespace halo::sched;

namespace {
std::vector<Group> random_groups(std::mt19937_64& rng, int n) {
  std::uniform_real_distribution<double> u(1.0, 10.0);
  std::exponential_distribution<double> e(1.0);
  std::vector<Group> gs;
  for (int i = 0; i < n; ++i) gs.push_back(Group{u(rng) * 1e6, u(rng) * 1e5, u(rng) * 1e3, 0.0, e(rng)});
  return gs;
}
std::vector<Device> random_devices(std::mt19937_64& rng, int n) {
  std::uniform_real_distribution<double> u(1.0, 4.0), p(0.0, 0.1);
  std::vector<Device> ds;
  for (int i = 0; i < n; ++i) {
    Device d;
    d.speed = u(rng) * 1e9;
    d.bandwidth = u(rng) * 1e6;
    d.latency = 1e-4;
    d.plr = p(rng);
    ds.push_back(d);
  }
  return ds;
}
}  // namespace

TEST_CASE("balance places every group once and respects capacity and the loss budget") {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 20; ++trial) {
    auto gs = random_groups(rng, 200);
    auto ds = random_devices(rng, 8);
    double total_w = 0, total_imp = 0;
    for (auto& g : gs) total_w += g.weight_bytes, total_imp += g.importance;
    const bool tight = trial % 2 == 0;  // tight: 8 devices x 1/6 of the weights each
    if (tight)
      for (auto& d : ds) d.capacity_bytes = total_w / 6;
    const Plan plan = balance(gs, ds, Policy::halo, 0.03);
    REQUIRE(plan.device_of.size() == gs.size());
    std::vector<double> used(ds.size(), 0.0), time(ds.size(), 0.0);
    double loss = 0;
    for (size_t g = 0; g < gs.size(); ++g) {
      const int d = plan.device_of[g];
      REQUIRE(d >= 0);
      REQUIRE(d < static_cast<int>(ds.size()));
      used[d] += gs[g].weight_bytes;
      time[d] += gs[g].flops / ds[d].speed + gs[g].exchange_bytes / ds[d].bandwidth;
      loss += gs[g].importance * ds[d].plr;
    }
    for (size_t d = 0; d < ds.size(); ++d) {
      REQUIRE(used[d] <= ds[d].capacity_bytes);
      if (time[d] > 0) REQUIRE(plan.device_time[d] == Approx(time[d] + ds[d].latency));
    }
    REQUIRE(loss == Approx(plan.expected_loss));
    double min_plr = 1;
    for (auto& d : ds) min_plr = std::min(min_plr, d.plr);
    // With room everywhere the budget is reachable whenever the most reliable device is under it.
    if (!tight && min_plr < 0.03) REQUIRE(loss <= 0.03 * total_imp * (1 + 1e-9));
  }
}

TEST_CASE("balance beats the round-robin split on heterogeneous devices") {
  std::mt19937_64 rng(3);
  auto gs = random_groups(rng, 1000);
  auto ds = random_devices(rng, 16);
  const double fast = balance(gs, ds, Policy::makespan, 0).makespan;
  const double naive = balance(gs, ds, Policy::round_robin, 0).makespan;
  REQUIRE(fast < naive);
}

TEST_CASE("bad device specs are rejected with the function and the value") {
  std::vector<Group> gs(3, Group{1, 1, 1, 0, 1});
  Device bad;
  bad.plr = 1.5;
  REQUIRE_THROWS_WITH(balance(gs, {bad}, Policy::halo, 0.01), Catch::Contains("[balance]") && Catch::Contains("1.5"));
  Device slow;
  slow.speed = -1;
  REQUIRE_THROWS_AS(balance(gs, {slow}, Policy::halo, 0.01), halo::InvalidArgument);
  REQUIRE_THROWS_AS(balance(gs, {}, Policy::halo, 0.01), halo::InvalidArgument);
  Device tiny;
  tiny.capacity_bytes = 0.5;
  REQUIRE_THROWS_WITH(balance(gs, {tiny}, Policy::halo, 0.01), Catch::Contains("fits on no device"));
}

TEST_CASE("monitor converges to the true loss rate") {
  PlrMonitor m(2, 0.005);
  std::mt19937_64 rng(11);
  std::bernoulli_distribution lose0(0.05), lose1(0.2);
  for (int i = 0; i < 20000; ++i) {
    m.observe(0, !lose0(rng), 0.010);
    m.observe(1, !lose1(rng), 0.030);
  }
  REQUIRE(m.plr(0) == Approx(0.05).margin(0.02));
  REQUIRE(m.plr(1) == Approx(0.2).margin(0.04));
  REQUIRE(m.latency(1) == Approx(0.030));
  REQUIRE(m.drifted(0.01));
  m.mark();
  REQUIRE_FALSE(m.drifted(0.01));
  REQUIRE_THROWS_AS(m.observe(2, true, 0.0), halo::InvalidArgument);
}

TEST_CASE("simulator is reproducible per seed and lossless links lose nothing") {
  std::mt19937_64 rng(5);
  auto gs = random_groups(rng, 64);
  auto ds = random_devices(rng, 64);
  for (auto& d : ds) d.burst_length = 3;
  std::vector<int32_t> place(gs.size());
  std::vector<uint8_t> crit(gs.size(), 0);
  for (size_t g = 0; g < gs.size(); ++g) place[g] = static_cast<int32_t>(g % ds.size());
  SimConfig c;
  c.steps = 50;
  c.seed = 42;
  const SimResult a = simulate(gs, ds, place, crit, c), b = simulate(gs, ds, place, crit, c);
  REQUIRE(a.tcp_time == b.tcp_time);
  REQUIRE(a.halo_time == b.halo_time);
  REQUIRE(a.delivered == b.delivered);
  c.seed = 43;
  REQUIRE(simulate(gs, ds, place, crit, c).delivered != a.delivered);
  for (auto& d : ds) d.plr = 0;
  const SimResult clean = simulate(gs, ds, place, crit, c);
  for (int s = 0; s < c.steps; ++s) {
    REQUIRE(clean.tcp_time[s] == Approx(clean.lossless_time));
    REQUIRE(clean.halo_time[s] == Approx(clean.lossless_time));
  }
  for (auto v : clean.delivered) REQUIRE(v == 1);
}

TEST_CASE("Gilbert-Elliott links lose the configured fraction of packets") {
  // One device, one group of many packets: the HALO mask's loss rate estimates the link's.
  std::vector<Group> gs(1, Group{1, 0, 1400, 0, 1});
  Device d;
  d.plr = 0.1;
  d.burst_length = 4;
  std::vector<int32_t> place(1, 0);
  std::vector<uint8_t> crit(1, 0);
  SimConfig c;
  c.steps = 20000;
  const SimResult r = simulate(gs, {d}, place, crit, c);
  double lost = 0, runs = 0;
  for (size_t s = 0; s < r.delivered.size(); ++s) {
    lost += r.delivered[s] ? 0 : 1;
    runs += !r.delivered[s] && (s == 0 || r.delivered[s - 1]);  // a run of losses starts here
  }
  REQUIRE(lost / c.steps == Approx(0.1).margin(0.015));
  // The mean run of consecutive losses is the burst length (Bernoulli would give 1/(1-plr)).
  REQUIRE(lost / runs == Approx(4.0).margin(0.4));
}
