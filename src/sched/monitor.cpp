#include "halo/sched/monitor.hpp"

#include <cmath>

#include "halo/core/error.hpp"

namespace halo::sched {

PlrMonitor::PlrMonitor(int32_t devices, double alpha) : alpha_(alpha) {
  require(devices > 0, "PlrMonitor", "devices must be > 0, got ", devices);
  require(alpha > 0 && alpha <= 1, "PlrMonitor", "alpha must be in (0, 1], got ", alpha);
  loss_.assign(devices, 0.0);
  loss_weight_.assign(devices, 0.0);
  lat_.assign(devices, 0.0);
  lat_weight_.assign(devices, 0.0);
  marked_.assign(devices, 0.0);
  count_.assign(devices, 0);
}

void PlrMonitor::check(int32_t device) const {
  require(device >= 0 && device < devices(), "PlrMonitor", "device ", device, " out of range [0, ", devices(), ")");
}

// Unnormalised EWMA plus the EWMA of 1s: their ratio is the bias-corrected mean.
void PlrMonitor::observe(int32_t device, bool delivered, double latency) {
  check(device);
  loss_[device] = (1 - alpha_) * loss_[device] + alpha_ * (delivered ? 0.0 : 1.0);
  loss_weight_[device] = (1 - alpha_) * loss_weight_[device] + alpha_;
  if (delivered) {
    require(std::isfinite(latency) && latency >= 0, "PlrMonitor.observe", "latency must be >= 0, got ", latency);
    lat_[device] = (1 - alpha_) * lat_[device] + alpha_ * latency;
    lat_weight_[device] = (1 - alpha_) * lat_weight_[device] + alpha_;
  }
  ++count_[device];
}

double PlrMonitor::plr(int32_t device) const {
  check(device);
  return loss_weight_[device] > 0 ? loss_[device] / loss_weight_[device] : 0.0;
}

double PlrMonitor::latency(int32_t device) const {
  check(device);
  return lat_weight_[device] > 0 ? lat_[device] / lat_weight_[device] : 0.0;
}

int64_t PlrMonitor::count(int32_t device) const {
  check(device);
  return count_[device];
}

bool PlrMonitor::drifted(double threshold) const {
  for (int32_t d = 0; d < devices(); ++d)
    if (std::fabs(plr(d) - marked_[d]) > threshold) return true;
  return false;
}

void PlrMonitor::mark() {
  for (int32_t d = 0; d < devices(); ++d) marked_[d] = plr(d);
}

}  // namespace halo::sched
