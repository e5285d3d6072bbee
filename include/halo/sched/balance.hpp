// PLR-aware placement of neuron groups on tensor-parallel devices.
//
// Offers the device and group descriptions, the cost model (a device's step
// time = latency + its groups' compute + transfer time), the fast balancer
// (LPT placement under a loss budget followed by move/swap local search) and
// the evaluation of a placement. The exact ILP oracle lives in Python (HiGHS).
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace halo::sched {

struct Device {
  double speed = 1.0;             // FLOP/s
  double bandwidth = 1.0;         // bytes/s, device -> aggregator
  double bandwidth_down = 0.0;    // bytes/s, aggregator -> device (0: same as bandwidth)
  double latency = 0.0;           // one-way seconds
  double plr = 0.0;               // long-run packet-loss rate in [0, 1)
  double burst_length = 1.0;      // mean length of a loss burst (Gilbert-Elliott); 1 = Bernoulli
  double capacity_bytes = 1e300;  // weight memory available for groups
};

struct Group {
  double flops = 0.0;
  double weight_bytes = 0.0;
  double exchange_bytes = 0.0;  // partial result sent back per step
  double input_bytes = 0.0;     // activations sent to the device per step
  double importance = 0.0;
};

// Throws InvalidArgument naming `function` and the offending field.
void validate_devices(std::string_view function, const std::vector<Device>& devices);
void validate_groups(std::string_view function, const std::vector<Group>& groups);

// Seconds group g costs on device d (compute + both transfers).
double group_time(const Group& g, const Device& d);

struct Plan {
  std::vector<int32_t> device_of;  // group -> device
  std::vector<double> device_time; // latency + sum of group_time per device
  double makespan = 0.0;           // expected step time
  double expected_loss = 0.0;      // sum importance * plr of the group's device
};

Plan evaluate(const std::vector<Group>& groups, const std::vector<Device>& devices,
              const std::vector<int32_t>& device_of);

enum class Policy { halo, makespan, round_robin };

// loss_budget: the largest allowed sum of importance * plr (as a fraction of
// the total importance). Policy::makespan ignores the budget; round_robin
// places group i on device i % D (the naive TP split, for comparison).
Plan balance(const std::vector<Group>& groups, const std::vector<Device>& devices, Policy policy,
             double loss_budget);

}  // namespace halo::sched
