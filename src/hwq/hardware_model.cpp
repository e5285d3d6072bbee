// Default structural delay model, code books per frequency tier, JSON schema.
#include "halo/hwq/hardware_model.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "halo/core/error.hpp"

namespace halo::hwq {

namespace {

constexpr int kSchemaVersion = 1;

int grid_min(int bits) { return -(1 << (bits - 1)); }
int grid_size(int bits) { return 1 << bits; }

std::vector<double> structural_table(int bits) {
  const DelayCoefficients coefficients = default_coefficients(bits);
  std::vector<double> table(grid_size(bits));
  for (int i = 0; i < grid_size(bits); ++i) table[i] = structural_delay(grid_min(bits) + i, coefficients);
  return table;
}

bool finite_positive(double value) { return std::isfinite(value) && value > 0; }

}  // namespace

int active_rows(int value) { return std::popcount(static_cast<unsigned>(value < 0 ? -value : value)); }

int bit_span(int value) {
  const unsigned magnitude = static_cast<unsigned>(value < 0 ? -value : value);
  if (magnitude == 0) return 0;
  return std::bit_width(magnitude) - std::countr_zero(magnitude);
}

double structural_delay(int value, const DelayCoefficients& c) {
  if (value == 0) return c.base_ns;
  return c.base_ns + c.per_row_ns * (active_rows(value) - 1) + c.per_span_ns * bit_span(value) +
         (value < 0 ? c.negative_ns : 0.0);
}

// Chosen so that, at the paper's clocks, the 4-bit grid splits into 8 values at 3.7 GHz
// ({-8,-4,-2,-1,0,1,2,4}), 15 at 2.4 GHz (all but -7) and all 16 at 1.9 GHz, and the wider
// 8-bit multiplier (smaller per-row/span steps, longer chains) fits whole at 1.9 GHz.
DelayCoefficients default_coefficients(int bits) {
  if (bits == 4) return {0.15, 0.07, 0.04, 0.04};
  if (bits == 8) return {0.15, 0.035, 0.02, 0.02};
  fail("default_coefficients", "bits must be 4 or 8, got ", bits);
}

HardwareModel HardwareModel::default_model() {
  HardwareModel model;
  model.delay4 = structural_table(4);
  model.delay8 = structural_table(8);
  // Power of the array ~ C V^2 f, normalised to 1 W at (1.0 V, 1.9 GHz).
  for (const auto& [voltage, frequency] : {std::pair{1.0, 1.9}, std::pair{1.1, 2.4}, std::pair{1.2, 3.7}}) {
    model.points.push_back({voltage, frequency, voltage * voltage * frequency / 1.9});
  }
  model.switch_cost_ns = 50.0;
  model.switch_energy_nj = 5.0;
  model.static_power_w = 0.5;
  model.array_rows = 32;
  model.array_cols = 32;
  model.sparse_macs_per_cycle = 64;
  model.tile_rows = 128;
  model.tile_cols = 128;
  return model;
}

void HardwareModel::validate(std::string_view fn) const {
  require(delay4.size() == 16, fn, "delay4 must hold 16 delays (values -8..7), got ", delay4.size());
  require(delay8.size() == 256, fn, "delay8 must hold 256 delays (values -128..127), got ", delay8.size());
  for (int bits : {4, 8}) {
    const auto& table = delays(bits);
    for (size_t i = 0; i < table.size(); ++i) {
      require(finite_positive(table[i]), fn, "delay", bits, " of value ", grid_min(bits) + static_cast<int>(i),
              " must be a positive finite number of ns, got ", table[i]);
    }
  }
  require(!points.empty(), fn, "at least one operating point is needed");
  for (size_t p = 0; p < points.size(); ++p) {
    const OperatingPoint& point = points[p];
    require(finite_positive(point.voltage) && point.voltage < 10, fn, "operating point ", p,
            ": voltage must be in (0, 10) V, got ", point.voltage);
    require(finite_positive(point.frequency_ghz) && point.frequency_ghz < 100, fn, "operating point ", p,
            ": frequency_ghz must be in (0, 100), got ", point.frequency_ghz);
    require(finite_positive(point.power_w), fn, "operating point ", p, ": power_w must be positive, got ",
            point.power_w);
    if (p > 0) {
      require(point.frequency_ghz > points[p - 1].frequency_ghz, fn,
              "operating points must be sorted by strictly ascending frequency; point ", p, " has ",
              point.frequency_ghz, " GHz after ", points[p - 1].frequency_ghz, " GHz");
    }
    for (int bits : {4, 8}) {
      require(delay(bits, 0) <= 1.0 / point.frequency_ghz, fn, "operating point ", p, " (", point.frequency_ghz,
              " GHz) does not admit the value 0 of the ", bits, "-bit grid (delay ", delay(bits, 0), " ns)");
    }
  }
  require(std::isfinite(switch_cost_ns) && switch_cost_ns >= 0, fn, "switch_cost_ns must be >= 0, got ",
          switch_cost_ns);
  require(std::isfinite(switch_energy_nj) && switch_energy_nj >= 0, fn, "switch_energy_nj must be >= 0, got ",
          switch_energy_nj);
  require(std::isfinite(static_power_w) && static_power_w >= 0, fn, "static_power_w must be >= 0, got ",
          static_power_w);
  require(array_rows > 0 && array_cols > 0, fn, "mac_array must be two positive sizes, got ", array_rows, "x",
          array_cols);
  require(sparse_macs_per_cycle > 0, fn, "sparse_macs_per_cycle must be > 0, got ", sparse_macs_per_cycle);
  require(tile_rows > 0 && tile_cols > 0, fn, "tile must be two positive sizes, got ", tile_rows, "x", tile_cols);
}

const std::vector<double>& HardwareModel::delays(int bits) const {
  if (bits == 4) return delay4;
  if (bits == 8) return delay8;
  fail("HardwareModel.delays", "bits must be 4 or 8, got ", bits);
}

double HardwareModel::delay(int bits, int value) const {
  const int lo = grid_min(bits);
  require(value >= lo && value < lo + grid_size(bits), "HardwareModel.delay", "value ", value,
          " is outside the signed ", bits, "-bit grid");
  return delays(bits)[value - lo];
}

std::vector<int> HardwareModel::code_book(int bits, size_t point) const {
  require(point < points.size(), "HardwareModel.code_book", "point ", point, " out of range (", points.size(),
          " points)");
  const auto& table = delays(bits);
  const double period = 1.0 / points[point].frequency_ghz;
  std::vector<int> values;
  for (int i = 0; i < grid_size(bits); ++i) {
    if (table[i] <= period) values.push_back(grid_min(bits) + i);
  }
  return values;
}

int HardwareModel::nominal_point(int bits) const {
  for (int p = static_cast<int>(points.size()) - 1; p >= 0; --p) {
    if (code_book(bits, p).size() == static_cast<size_t>(grid_size(bits))) return p;
  }
  return -1;
}

std::string to_json(const HardwareModel& model) {
  nlohmann::json doc;
  doc["schema"] = "halo.hwq.hardware_model";
  doc["version"] = kSchemaVersion;
  doc["delay_ns"] = {{"int4", model.delay4}, {"int8", model.delay8}};
  nlohmann::json points = nlohmann::json::array();
  for (const auto& p : model.points) {
    points.push_back({{"voltage", p.voltage}, {"frequency_ghz", p.frequency_ghz}, {"power_w", p.power_w}});
  }
  doc["operating_points"] = points;
  doc["switch_cost_ns"] = model.switch_cost_ns;
  doc["switch_energy_nj"] = model.switch_energy_nj;
  doc["static_power_w"] = model.static_power_w;
  doc["mac_array"] = {model.array_rows, model.array_cols};
  doc["sparse_macs_per_cycle"] = model.sparse_macs_per_cycle;
  doc["tile"] = {model.tile_rows, model.tile_cols};
  return doc.dump(2);
}

HardwareModel from_json(const std::string& text) {
  const char* fn = "HardwareModel.from_json";
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& error) {
    fail<FormatError>(fn, "not valid JSON: ", error.what());
  }
  HardwareModel model;
  const char* field = "";
  try {
    require(doc.is_object(), fn, "the document must be a JSON object");
    field = "schema";
    if (doc.contains("schema")) {
      require(doc.at("schema") == "halo.hwq.hardware_model", fn, "schema must be 'halo.hwq.hardware_model', got ",
              doc.at("schema").dump());
    }
    field = "version";
    if (doc.contains("version")) {
      require(doc.at("version") == kSchemaVersion, fn, "unsupported version ", doc.at("version").dump());
    }
    field = "delay_ns.int4";
    model.delay4 = doc.at("delay_ns").at("int4").get<std::vector<double>>();
    field = "delay_ns.int8";
    model.delay8 = doc.at("delay_ns").at("int8").get<std::vector<double>>();
    field = "operating_points";
    for (const auto& p : doc.at("operating_points")) {
      model.points.push_back(
          {p.at("voltage").get<double>(), p.at("frequency_ghz").get<double>(), p.at("power_w").get<double>()});
    }
    field = "switch_cost_ns";
    model.switch_cost_ns = doc.at("switch_cost_ns").get<double>();
    field = "switch_energy_nj";
    model.switch_energy_nj = doc.at("switch_energy_nj").get<double>();
    field = "static_power_w";
    model.static_power_w = doc.at("static_power_w").get<double>();
    field = "mac_array";
    const auto array = doc.at("mac_array").get<std::vector<int>>();
    require(array.size() == 2, fn, "mac_array must be [rows, cols], got ", doc.at("mac_array").dump());
    model.array_rows = array[0];
    model.array_cols = array[1];
    field = "sparse_macs_per_cycle";
    model.sparse_macs_per_cycle = doc.at("sparse_macs_per_cycle").get<int>();
    field = "tile";
    const auto tile = doc.at("tile").get<std::vector<int>>();
    require(tile.size() == 2, fn, "tile must be [rows, cols], got ", doc.at("tile").dump());
    model.tile_rows = tile[0];
    model.tile_cols = tile[1];
  } catch (const nlohmann::json::exception& error) {
    fail(fn, "field '", field, "' is missing or has the wrong type: ", error.what());
  }
  model.validate(fn);
  return model;
}

void save_json(const HardwareModel& model, const std::string& path) {
  model.validate("HardwareModel.save");
  const std::string temp = path + ".tmp";
  {
    std::ofstream out(temp, std::ios::trunc);
    require(static_cast<bool>(out), "HardwareModel.save", "cannot write '", temp, "'");
    out << to_json(model) << '\n';
    require(static_cast<bool>(out), "HardwareModel.save", "writing '", temp, "' failed");
  }
  require(std::rename(temp.c_str(), path.c_str()) == 0, "HardwareModel.save", "cannot rename '", temp, "' to '",
          path, "'");
}

HardwareModel load_json(const std::string& path) {
  std::ifstream in(path);
  require(static_cast<bool>(in), "HardwareModel.load", "cannot read '", path, "'");
  std::ostringstream text;
  text << in.rdbuf();
  return from_json(text.str());
}

}  // namespace halo::hwq
