// The accelerator description HALO quantizes against (arXiv 2502.19662).
//
// A HardwareModel describes an INT8 MAC array (and, for the 4-bit grid mode,
// a 4-bit one): per voltage corner (operating point), the critical-path delay
// of a multiply by each weight value; per value, the dynamic energy of one MAC
// at 1 V (switching activity: E = energy_pj[w] * V^2); the DVFS operating
// points (voltage, clock, leakage, code-book size limit), the cost of switching
// between them, the MAC-array and sparse-engine shapes, the memory system and
// the FP16 MAC used as a baseline. A point admits the values whose delay at its
// corner fits in its clock period. The default model derives delays and
// energies from multiplier structure; JSON load/save lets measured synthesis
// (STA/power) tables replace it (schema and version-1 compatibility in
// docs/hwq.md).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace halo::hwq {

// How dynamic energy is modelled. `activity` (schema version 2 default): per-value MAC energy scaled by V^2,
// leakage per point, memory energy per byte. `power`: version 1's fixed array power per point.
enum class EnergyModel { activity, power };

// Which tiles a quantizer run may speed up: `performance` runs tiles at faster clocks than nominal;
// `energy` keeps the nominal clock and lowers the voltage where the slack allows.
enum class Mode { performance, energy };

std::string_view energy_model_name(EnergyModel model);
std::string_view mode_name(Mode mode);
Mode parse_mode(std::string_view name);  // "performance" | "energy"

struct OperatingPoint {
  double voltage = 0;        // V
  double frequency_ghz = 0;  // clock, GHz (period = 1 / frequency_ghz ns)
  double power_w = 0;        // `power` energy model only: power drawn by the MAC array at this point, W
  double leakage_w = 0;      // `activity` model: leakage power of the array at this voltage, W
  int book_size = 16;        // INT8-subset mode: most values a tile's code book may hold at this point
};

// delay(w) = base + per_row * (active partial-product rows - 1) + per_span * bit span + negative * [w < 0]
// (rows and span of |w|; w = 0 has no rows and costs `base`), at 1.0 V.
struct DelayCoefficients {
  double base_ns;
  double per_row_ns;
  double per_span_ns;
  double negative_ns;
};

// Number of set bits of |value|: the partial-product rows a shift-add multiplier activates.
int active_rows(int value);
// Distance from the lowest to the highest set bit of |value|, plus one (0 for value 0).
int bit_span(int value);
// The default delay formula for one value at 1.0 V.
double structural_delay(int value, const DelayCoefficients& coefficients);
// Delay at `voltage` relative to 1.0 V under the alpha-power law (threshold 0.35 V, alpha 1.3).
double voltage_delay_factor(double voltage);
DelayCoefficients default_coefficients(int bits);  // bits 4 or 8
// Default energy of one MAC at 1 V: 0.03 pJ per active partial-product row of the weight (the part that
// depends on the weight; the accumulate and activation paths, common to every method, are left out).
double structural_energy_pj(int value);

struct SparseEngine {       // applies the full-precision CSR part (FP16-class MACs)
  int macs_per_cycle = 64;
  double mac_energy_pj = 1.0;  // per MAC at 1 V
};

struct MemorySystem {       // weight traffic; 0 switches a term off
  double bandwidth_gbps = 0;
  double energy_pj_per_byte = 0;
};

struct HardwareModel {
  std::vector<std::vector<double>> delay4;  // [point][16]: values -8..7
  std::vector<std::vector<double>> delay8;  // [point][256]: values -128..127
  EnergyModel energy_model = EnergyModel::activity;
  std::vector<double> energy4;  // 16 entries: pJ per MAC at 1 V
  std::vector<double> energy8;  // 256 entries
  std::vector<OperatingPoint> points;  // ascending (frequency, voltage)
  double switch_cost_ns = 0;     // stall per DVFS switch
  double switch_energy_nj = 0;   // energy per DVFS switch
  double static_power_w = 0;     // power drawn regardless of the point (control), W
  int array_rows = 0;            // MAC array shape: MACs per cycle = array_rows * array_cols
  int array_cols = 0;
  SparseEngine sparse;
  double fp16_mac_pj = 1.0;      // FP16 MAC energy at 1 V (the FP16 baseline)
  MemorySystem memory;
  int tile_rows = 0;             // default weight tile shape for the quantizer
  int tile_cols = 0;

  // The paper's three points (1.0 V, 1.9 GHz), (1.1 V, 2.4 GHz), (1.2 V, 3.7 GHz) with book sizes 16 and 9 at
  // the two fast ones, plus (0.8 V, 1.9 GHz) and (0.9 V, 1.9 GHz) for the energy-first mode; structural delays
  // scaled per corner, structural energies.
  static HardwareModel default_model();

  // Throws InvalidArgument naming `function` and the bad field.
  void validate(std::string_view function) const;

  const std::vector<double>& delays(int bits, size_t point) const;  // bits 4 or 8
  double delay(int bits, int value, size_t point) const;
  const std::vector<double>& energies(int bits) const;
  // Energy of one MAC by `value` at points[point] (energy_pj * V^2), pJ.
  double mac_energy_pj(int bits, int value, size_t point) const;
  // Sorted values of the `bits` grid whose delay at points[point] fits its clock period.
  std::vector<int> admitted(int bits, size_t point) const;
  // The fastest clock at which some point admits the whole grid, at the lowest such voltage (where a uniform
  // quantizer and the W8A8/FP16 baselines run); -1 if none.
  int nominal_point(int bits) const;
  // The points a quantizer run may use, from the nominal point (rung 0) to the most aggressive:
  // performance: the nominal point, then every faster point (ascending clock, higher voltage first);
  // energy: the nominal point, then the points at the nominal clock with lower voltage (descending).
  std::vector<int> ladder(Mode mode, int bits) const;
};

std::string to_json(const HardwareModel& model);
// Parses and validates a version 1 or 2 document; FormatError on malformed JSON, InvalidArgument on bad
// fields or values.
HardwareModel from_json(const std::string& text);
void save_json(const HardwareModel& model, const std::string& path);  // temp file then rename
HardwareModel load_json(const std::string& path);

}  // namespace halo::hwq
