// Seeded discrete-time simulator of one tensor-parallel step repeated over
// `steps`: every device computes its groups in order and streams each group's
// partial result as packets over its own lossy link (Bernoulli or
// Gilbert-Elliott bursts). Two aggregators see the same cluster:
//   tcp  - every lost packet is resent after `rto`; the step ends when all arrived.
//   halo - critical groups are resent after `nack_timeout` (receiver-driven);
//          the others are sent once and dropped if lost or later than the
//          deadline (deadline_factor x the lossless step time).
// Reproducible per seed; the delivered mask lets the caller zero-fill the
// dropped partial results in real layer math.
#pragma once

#include <cstdint>
#include <vector>

#include "halo/sched/balance.hpp"

namespace halo::sched {

struct SimConfig {
  double packet_bytes = 1400;
  double rto = 0.2;            // TCP minimum retransmission timeout (Linux default 200 ms)
  double nack_timeout = 0.0;   // 0: two one-way latencies plus one packet time
  double deadline_factor = 1.5;
  int32_t steps = 1;
  uint64_t seed = 0;
};

struct SimResult {
  std::vector<double> tcp_time;          // per step
  std::vector<double> halo_time;         // per step
  std::vector<uint8_t> delivered;        // steps x groups, halo aggregator
  double lossless_time = 0.0;
};

SimResult simulate(const std::vector<Group>& groups, const std::vector<Device>& devices,
                   const std::vector<int32_t>& device_of, const std::vector<uint8_t>& critical,
                   const SimConfig& config);

}  // namespace halo::sched
