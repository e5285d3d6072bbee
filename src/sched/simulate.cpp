#include "halo/sched/simulate.hpp"

#include <algorithm>
#include <cmath>

#include "halo/core/error.hpp"

namespace halo::sched {

namespace {

// SplitMix64: a fixed, platform-independent stream so runs match everywhere.
struct Rng {
  uint64_t state;
  double uniform() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return static_cast<double>(z >> 11) * 0x1.0p-53;
  }
};

// Gilbert-Elliott link: lose every packet in the bad state, none in the good
// one; leave bad with 1/burst_length so bursts average burst_length packets and
// the stationary loss rate is plr. burst_length == 1 is plain Bernoulli loss.
struct Link {
  double plr, burst;
  bool bad = false;
  Rng rng;
  bool lost() {
    if (plr <= 0) return false;
    if (burst <= 1.0) return rng.uniform() < plr;
    const double u = rng.uniform();
    if (bad)
      bad = u >= 1.0 / burst;
    else
      bad = u < plr / (burst * (1.0 - plr));
    return bad;
  }
};

struct DeviceSchedule {
  std::vector<int32_t> groups;
  double start = 0;  // latency + input transfer before compute begins
};

}  // namespace

SimResult simulate(const std::vector<Group>& groups, const std::vector<Device>& devices,
                   const std::vector<int32_t>& device_of, const std::vector<uint8_t>& critical,
                   const SimConfig& config) {
  constexpr const char* fn = "simulate";
  validate_devices(fn, devices);
  validate_groups(fn, groups);
  require(devices.size() <= 4096, fn, "at most 4096 devices, got ", devices.size());
  require(device_of.size() == groups.size(), fn, "placement has ", device_of.size(), " entries for ",
          groups.size(), " groups");
  require(critical.size() == groups.size(), fn, "critical has ", critical.size(), " entries for ", groups.size(),
          " groups");
  require(config.packet_bytes > 0 && std::isfinite(config.packet_bytes), fn, "packet_bytes must be > 0, got ",
          config.packet_bytes);
  require(config.rto > 0 && std::isfinite(config.rto), fn, "rto must be > 0, got ", config.rto);
  require(config.nack_timeout >= 0 && std::isfinite(config.nack_timeout), fn, "nack_timeout must be >= 0, got ",
          config.nack_timeout);
  require(config.deadline_factor >= 1 && std::isfinite(config.deadline_factor), fn,
          "deadline_factor must be >= 1, got ", config.deadline_factor);
  require(config.steps > 0 && config.steps <= 1000000, fn, "steps must be in [1, 1e6], got ", config.steps);

  const size_t G = groups.size(), D = devices.size();
  std::vector<DeviceSchedule> sched(D);
  for (size_t g = 0; g < G; ++g) {
    require(device_of[g] >= 0 && static_cast<size_t>(device_of[g]) < D, fn, "group ", g, " placed on device ",
            device_of[g]);
    sched[device_of[g]].groups.push_back(static_cast<int32_t>(g));
  }
  for (size_t d = 0; d < D; ++d) {
    const Device& dev = devices[d];
    const double down = dev.bandwidth_down > 0 ? dev.bandwidth_down : dev.bandwidth;
    double input = 0;
    for (int32_t g : sched[d].groups) input += groups[g].input_bytes;
    sched[d].start = dev.latency + input / down;
  }

  // One pass of the step for one aggregator; fills arrival and delivered per group.
  auto run_step = [&](std::vector<Link>& links, bool tcp, std::vector<double>& arrival, std::vector<uint8_t>& ok) {
    for (size_t d = 0; d < D; ++d) {
      const Device& dev = devices[d];
      const double ser = config.packet_bytes / dev.bandwidth;
      const double resend = tcp ? config.rto : (config.nack_timeout > 0 ? config.nack_timeout : 2 * dev.latency + ser);
      double compute_done = sched[d].start, link_free = 0;
      for (int32_t g : sched[d].groups) {
        compute_done += groups[g].flops / dev.speed;
        double t = std::max(link_free, compute_done);
        const auto packets = static_cast<int64_t>(std::ceil(groups[g].exchange_bytes / config.packet_bytes));
        const bool reliable = tcp || critical[g];
        bool all = true;
        for (int64_t p = 0; p < packets; ++p) {
          bool lost = links[d].lost();
          if (reliable) {
            for (int tries = 0; lost && tries < 10000; ++tries) {
              t += ser + resend;  // the lost copy, then the wait before resending
              lost = links[d].lost();
            }
          } else if (lost) {
            all = false;
          }
          t += ser;
        }
        link_free = t;
        arrival[g] = t + dev.latency;
        ok[g] = all;
      }
    }
  };

  SimResult result;
  // Lossless step time: the same schedule with perfect links.
  {
    std::vector<Link> clean(D, Link{0.0, 1.0, false, Rng{0}});
    std::vector<double> arrival(G, 0.0);
    std::vector<uint8_t> ok(G, 1);
    run_step(clean, true, arrival, ok);
    for (double a : arrival) result.lossless_time = std::max(result.lossless_time, a);
  }
  const double deadline = config.deadline_factor * result.lossless_time;
  auto make_links = [&](uint64_t salt) {
    std::vector<Link> links;
    for (size_t d = 0; d < D; ++d)
      links.push_back(Link{devices[d].plr, devices[d].burst_length, false,
                           Rng{config.seed * 0x2545F4914F6CDD1Dull + (d + 1) * 0x9E3779B97F4A7C15ull + salt}});
    return links;
  };
  std::vector<Link> tcp_links = make_links(1), halo_links = make_links(2);
  result.tcp_time.resize(config.steps);
  result.halo_time.resize(config.steps);
  result.delivered.assign(static_cast<size_t>(config.steps) * G, 0);
  std::vector<double> arrival(G);
  std::vector<uint8_t> ok(G);
  for (int32_t s = 0; s < config.steps; ++s) {
    run_step(tcp_links, true, arrival, ok);
    double tcp = 0;
    for (double a : arrival) tcp = std::max(tcp, a);
    result.tcp_time[s] = tcp;

    run_step(halo_links, false, arrival, ok);
    double crit = 0, rest = 0;
    bool waiting = false;  // a non-critical result that never comes: wait out the deadline
    for (size_t g = 0; g < G; ++g) {
      uint8_t got = ok[g];
      if (critical[g]) {
        crit = std::max(crit, arrival[g]);
      } else if (got && arrival[g] <= deadline) {
        rest = std::max(rest, arrival[g]);
      } else {
        got = 0;
        waiting = true;
      }
      result.delivered[static_cast<size_t>(s) * G + g] = got;
    }
    result.halo_time[s] = std::max(crit, waiting ? deadline : rest);
  }
  return result;
}

}  // namespace halo::sched
