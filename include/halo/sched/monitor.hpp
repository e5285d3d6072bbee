// Online estimate of each device's packet-loss rate and latency from observed
// deliveries: exponentially weighted averages with a bias-corrected start, so
// the first observations count fully and old ones fade with `alpha`.
#pragma once

#include <cstdint>
#include <vector>

namespace halo::sched {

class PlrMonitor {
 public:
  PlrMonitor(int32_t devices, double alpha);
  void observe(int32_t device, bool delivered, double latency);
  double plr(int32_t device) const;
  double latency(int32_t device) const;
  int64_t count(int32_t device) const;
  // True when any device's estimate moved more than `threshold` (absolute PLR)
  // since the last mark(); the caller then re-balances and calls mark().
  bool drifted(double threshold) const;
  void mark();
  int32_t devices() const { return static_cast<int32_t>(loss_.size()); }

 private:
  void check(int32_t device) const;
  double alpha_;
  std::vector<double> loss_, loss_weight_, lat_, lat_weight_, marked_;
  std::vector<int64_t> count_;
};

}  // namespace halo::sched
