// DVFS planning for HALO tiles and the latency/energy model.
//
// Each tile has the fastest operating point its code book allows. Tiles of a
// layer are independent partial products, so the plan first orders them by
// that point (fastest first, row-major inside a group); it then picks, for
// every tile in that order, a point no faster than wanted, changing the point
// at most `max_switches` times, so as to minimise compute time plus switch
// stalls (dynamic programming over tiles x switches used x current point).
// With fewer switches than groups, some tiles run slower than they could. The estimate compares against a uniform quantizer
// running every tile at the nominal point (the fastest one that admits the
// whole integer grid).
#pragma once

#include <cstdint>
#include <vector>

#include "halo/hwq/hardware_model.hpp"

namespace halo::hwq {

struct Plan {
  std::vector<int64_t> order;  // tile indices (row-major numbering) in execution order
  std::vector<int> point;      // per tile (row-major numbering): the point it runs at
  int switches = 0;            // point changes along `order`
};

// wanted[t]: fastest allowed point of tile t; macs[t]: multiply-accumulates of tile t per pass.
Plan plan_dvfs(const std::vector<int>& wanted, const std::vector<int64_t>& macs, const HardwareModel& model,
               int max_switches);

// Nanoseconds the MAC array needs for `macs` multiply-accumulates at points[point].
double compute_ns(const HardwareModel& model, double macs, int point);

struct Estimate {
  double latency_ns = 0, energy_nj = 0;
  double baseline_latency_ns = 0, baseline_energy_nj = 0;
  double speedup = 0;        // baseline latency / latency
  double energy_saving = 0;  // 1 - energy / baseline energy
  double average_bits = 0;   // stored bits per weight: codes + scales (fp32) + CSR (value, column, row pointers)
  double baseline_bits = 0;  // uniform grid bits + one fp32 scale per tile row segment
};

}  // namespace halo::hwq
