// DVFS planning for HALO tiles and the latency/energy estimate.
//
// A quantizer run uses a ladder of operating points (HardwareModel::ladder):
// rung 0 is the nominal point, later rungs are faster clocks (performance
// mode) or lower voltages at the nominal clock (energy mode). Each tile wants
// the most aggressive rung its sensitivity allows. Tiles of a layer are
// independent partial products, so the plan orders them by wanted rung (most
// aggressive first, row-major inside a group); it then picks, for every tile
// in that order, a rung no more aggressive than wanted, changing the point at
// most `max_switches` times, so as to minimise time (performance) or energy
// (energy mode) plus the switch costs: a dynamic program over tiles x switches
// used x current rung.
//
// The estimate prices the result and three baselines that run every weight at
// the nominal point: a uniform quantizer with as many bits per code as HALO
// stores, W8A8 (INT8 weights, per-channel scale) and FP16, each with the same
// memory-bandwidth and memory-energy terms.
#pragma once

#include <cstdint>
#include <vector>

#include "halo/hwq/hardware_model.hpp"

namespace halo::hwq {

struct Plan {
  std::vector<int64_t> order;  // tile indices (row-major numbering) in execution order
  std::vector<int> point;      // per tile (row-major numbering): the model point it runs at
  int switches = 0;            // point changes along `order`
};

// wanted[t]: the most aggressive rung of model.ladder(mode, bits) tile t may use; macs[t]: its multiply-
// accumulates per pass. Minimises time (performance) or an energy proxy (energy mode: V^2-scaled mean MAC
// energy plus leakage) plus switch costs.
Plan plan_dvfs(const std::vector<int>& wanted, const std::vector<int64_t>& macs, const HardwareModel& model,
               int max_switches, Mode mode = Mode::performance, int bits = 8);

// Nanoseconds the MAC array needs for `macs` multiply-accumulates at points[point].
double compute_ns(const HardwareModel& model, double macs, int point);

// One way of running a layer: latency = max(compute, memory); energy = dynamic + leakage + memory + static.
struct Cost {
  double latency_ns = 0, energy_nj = 0;
  double compute_ns = 0, memory_ns = 0;
  double dynamic_nj = 0, leakage_nj = 0, memory_nj = 0, static_nj = 0;
  double bits = 0;  // stored bits per weight (codes, scales, side structures)
};

struct Estimate {
  Cost halo;  // HALO's dense tiles and sparse part; compute_ns includes switch stalls
  double switch_ns = 0, switch_nj = 0;
  double sparse_ns = 0, sparse_nj = 0;  // sparse engine, concurrent with the dense array
  int sparse_point = 0;                 // the point the sparse engine runs at
  int nominal_point = 0;
  int64_t tokens = 0;
  Cost uniform;  // uniform quantizer, HALO's code bits, at the nominal point
  Cost w8a8;     // INT8 weights (per-channel absmax scale), at the nominal point
  Cost fp16;     // FP16 weights on FP16 MACs, at the nominal point
  // Against the uniform baseline (the library's historical headline):
  double latency_ns = 0, energy_nj = 0, baseline_latency_ns = 0, baseline_energy_nj = 0;
  double speedup = 0;        // uniform latency / HALO latency
  double energy_saving = 0;  // 1 - HALO energy / uniform energy
  double average_bits = 0, baseline_bits = 0;
};

struct Quantized;  // quantizer.hpp

// Prices `q` on `model` for `tokens` input columns per pass (0: the tokens q was planned for).
Estimate estimate(const Quantized& q, const HardwareModel& model, int64_t tokens = 0);

}  // namespace halo::hwq
