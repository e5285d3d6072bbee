// The accelerator description HALO quantizes against (arXiv 2502.19662).
//
// A HardwareModel holds, for the signed 4-bit (-8..7) and 8-bit (-128..127)
// integer weight grids, the critical-path delay (ns) of a multiply by each
// weight value, the DVFS operating points (voltage, clock, power), the cost
// of switching between them and the MAC-array shape. A frequency tier admits
// the values whose delay fits in its clock period: that set is the code book
// a tile may use when it runs at that clock. The default model derives delays
// from multiplier structure; JSON load/save lets measured synthesis tables
// replace it (schema in docs/hwq.md).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace halo::hwq {

struct OperatingPoint {
  double voltage = 0;        // V
  double frequency_ghz = 0;  // clock, GHz (period = 1 / frequency_ghz ns)
  double power_w = 0;        // power drawn by the MAC array at this point, W
};

// delay(w) = base + per_row * (active partial-product rows - 1) + per_span * bit span + negative * [w < 0]
// (rows and span of |w|; w = 0 has no rows and costs `base`).
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
// The default delay formula for one value.
double structural_delay(int value, const DelayCoefficients& coefficients);

struct HardwareModel {
  std::vector<double> delay4;  // 16 entries, index value + 8
  std::vector<double> delay8;  // 256 entries, index value + 128
  std::vector<OperatingPoint> points;  // ascending frequency
  double switch_cost_ns = 0;     // stall per DVFS switch
  double switch_energy_nj = 0;   // energy per DVFS switch
  double static_power_w = 0;     // power drawn regardless of the point (memory, control)
  int array_rows = 0;            // MAC array shape: MACs per cycle = array_rows * array_cols
  int array_cols = 0;
  int sparse_macs_per_cycle = 0;  // throughput of the unit applying the full-precision sparse part
  int tile_rows = 0;             // default weight tile shape for the quantizer
  int tile_cols = 0;

  // Structural delays with the paper's three points (1.0 V, 1.9 GHz), (1.1 V, 2.4 GHz), (1.2 V, 3.7 GHz).
  static HardwareModel default_model();

  // Throws InvalidArgument naming `function` and the bad field.
  void validate(std::string_view function) const;

  const std::vector<double>& delays(int bits) const;  // bits 4 or 8
  double delay(int bits, int value) const;
  // Sorted values of the `bits` grid whose delay fits the clock period of points[point].
  std::vector<int> code_book(int bits, size_t point) const;
  // Index of the fastest point that admits the whole grid (where a uniform quantizer runs), -1 if none.
  int nominal_point(int bits) const;
};

DelayCoefficients default_coefficients(int bits);

std::string to_json(const HardwareModel& model);
// Parses and validates; FormatError on malformed JSON, InvalidArgument on bad values.
HardwareModel from_json(const std::string& text);
void save_json(const HardwareModel& model, const std::string& path);  // temp file then rename
HardwareModel load_json(const std::string& path);

}  // namespace halo::hwq
