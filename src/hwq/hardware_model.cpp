// Default structural delay/energy model, admitted values per point, ladders, JSON schema (versions 1 and 2).
#include "halo/hwq/hardware_model.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "halo/core/error.hpp"

namespace halo::hwq {

namespace {

constexpr int kSchemaVersion = 2;
using Json = nlohmann::json;

int grid_min(int bits) { return -(1 << (bits - 1)); }
int grid_size(int bits) { return 1 << bits; }

bool finite_positive(double value) { return std::isfinite(value) && value > 0; }
bool finite_nonnegative(double value) { return std::isfinite(value) && value >= 0; }

std::vector<double> structural_table(int bits, double voltage) {
  const DelayCoefficients coefficients = default_coefficients(bits);
  const double factor = voltage_delay_factor(voltage);
  std::vector<double> table(grid_size(bits));
  for (int i = 0; i < grid_size(bits); ++i) table[i] = structural_delay(grid_min(bits) + i, coefficients) * factor;
  return table;
}

std::vector<double> structural_energies(int bits) {
  std::vector<double> table(grid_size(bits));
  for (int i = 0; i < grid_size(bits); ++i) table[i] = structural_energy_pj(grid_min(bits) + i);
  return table;
}

}  // namespace

std::string_view energy_model_name(EnergyModel model) { return model == EnergyModel::power ? "power" : "activity"; }
std::string_view mode_name(Mode mode) { return mode == Mode::energy ? "energy" : "performance"; }

Mode parse_mode(std::string_view name) {
  if (name == "performance") return Mode::performance;
  if (name == "energy") return Mode::energy;
  fail("parse_mode", "mode must be 'performance' or 'energy', got '", name, "'");
}

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

double voltage_delay_factor(double voltage) {
  // Alpha-power law: gate delay ~ V / (V - Vt)^alpha, normalised to 1 at 1.0 V.
  constexpr double threshold = 0.35, alpha = 1.3;
  require(voltage > threshold && std::isfinite(voltage), "voltage_delay_factor", "voltage must be above ", threshold,
          " V, got ", voltage);
  return (voltage / std::pow(voltage - threshold, alpha)) / (1.0 / std::pow(1.0 - threshold, alpha));
}

// INT8: the whole grid fits 1.9 GHz at 1.0 V (slowest, -127: 0.525 ns); at (1.1 V, 2.4 GHz) 160 values fit and
// at (1.2 V, 3.7 GHz) the 28 values with at most two adjacent partial-product rows (0, ±2^k, ±3·2^k) do, so
// 64 meets 3.7 GHz and -127 only 1.9 GHz as the paper reports. 4-bit: 16 / 15 (all but -7) / 8 values
// ({-8, -4, -2, -1, 0, 1, 2, 4}) at the same three points. A modelling choice, not synthesis data.
DelayCoefficients default_coefficients(int bits) {
  if (bits == 4) return {0.15, 0.08, 0.045, 0.04};
  if (bits == 8) return {0.21, 0.01, 0.035, 0.01};
  fail("default_coefficients", "bits must be 4 or 8, got ", bits);
}

double structural_energy_pj(int value) { return 0.03 * active_rows(value); }

HardwareModel HardwareModel::default_model() {
  HardwareModel model;
  struct Corner {
    double voltage, frequency;
    int book;
  };
  for (const Corner& c : {Corner{0.8, 1.9, 16}, Corner{0.9, 1.9, 16}, Corner{1.0, 1.9, 16}, Corner{1.1, 2.4, 16},
                          Corner{1.2, 3.7, 9}}) {
    OperatingPoint point;
    point.voltage = c.voltage;
    point.frequency_ghz = c.frequency;
    point.power_w = c.voltage * c.voltage * c.frequency / 1.9;  // only read by the `power` energy model
    point.leakage_w = 0.03 * c.voltage * c.voltage * c.voltage;
    point.book_size = c.book;
    model.points.push_back(point);
    model.delay4.push_back(structural_table(4, c.voltage));
    model.delay8.push_back(structural_table(8, c.voltage));
  }
  model.energy_model = EnergyModel::activity;
  model.energy4 = structural_energies(4);
  model.energy8 = structural_energies(8);
  model.switch_cost_ns = 50.0;
  model.switch_energy_nj = 5.0;
  model.static_power_w = 0.0;
  model.array_rows = 32;
  model.array_cols = 32;
  model.sparse = {64, 1.0};
  model.fp16_mac_pj = 1.0;
  model.memory = {64.0, 5.0};
  model.tile_rows = 128;
  model.tile_cols = 128;
  return model;
}

void HardwareModel::validate(std::string_view fn) const {
  require(!points.empty(), fn, "at least one operating point is needed");
  for (int bits : {4, 8}) {
    const auto& tables = bits == 4 ? delay4 : delay8;
    require(tables.size() == points.size(), fn, "delay_ns.int", bits, " must hold one table per operating point (",
            points.size(), "), got ", tables.size());
    for (size_t p = 0; p < tables.size(); ++p) {
      require(tables[p].size() == static_cast<size_t>(grid_size(bits)), fn, "delay_ns.int", bits, " of point ", p,
              " must hold ", grid_size(bits), " delays (values ", grid_min(bits), "..", -grid_min(bits) - 1,
              "), got ", tables[p].size());
      for (size_t i = 0; i < tables[p].size(); ++i) {
        require(finite_positive(tables[p][i]), fn, "delay_ns.int", bits, " of point ", p, ", value ",
                grid_min(bits) + static_cast<int>(i), " must be a positive finite number of ns, got ", tables[p][i]);
      }
    }
    const auto& energy = bits == 4 ? energy4 : energy8;
    require(energy.size() == static_cast<size_t>(grid_size(bits)), fn, "energy_pj.int", bits, " must hold ",
            grid_size(bits), " energies, got ", energy.size());
    for (size_t i = 0; i < energy.size(); ++i) {
      require(finite_nonnegative(energy[i]), fn, "energy_pj.int", bits, " of value ",
              grid_min(bits) + static_cast<int>(i), " must be a finite number >= 0 of pJ, got ", energy[i]);
    }
  }
  for (size_t p = 0; p < points.size(); ++p) {
    const OperatingPoint& point = points[p];
    require(finite_positive(point.voltage) && point.voltage < 10, fn, "operating point ", p,
            ": voltage must be in (0, 10) V, got ", point.voltage);
    require(finite_positive(point.frequency_ghz) && point.frequency_ghz < 100, fn, "operating point ", p,
            ": frequency_ghz must be in (0, 100), got ", point.frequency_ghz);
    if (energy_model == EnergyModel::power) {
      require(finite_positive(point.power_w), fn, "operating point ", p, ": power_w must be positive, got ",
              point.power_w);
    } else {
      require(finite_nonnegative(point.power_w), fn, "operating point ", p, ": power_w must be >= 0, got ",
              point.power_w);
    }
    require(finite_nonnegative(point.leakage_w), fn, "operating point ", p, ": leakage_w must be >= 0, got ",
            point.leakage_w);
    require(point.book_size >= 1 && point.book_size <= 256, fn, "operating point ", p,
            ": book_size must be in 1..256, got ", point.book_size);
    if (p > 0) {
      const OperatingPoint& before = points[p - 1];
      const bool ascending = point.frequency_ghz > before.frequency_ghz ||
                             (point.frequency_ghz == before.frequency_ghz && point.voltage > before.voltage);
      require(ascending, fn, "operating points must be sorted by ascending frequency (then voltage), each pair once; "
              "point ", p, " (", point.voltage, " V, ", point.frequency_ghz, " GHz) follows (", before.voltage,
              " V, ", before.frequency_ghz, " GHz)");
    }
    for (int bits : {4, 8}) {
      require(delay(bits, 0, p) <= 1.0 / point.frequency_ghz, fn, "operating point ", p, " (", point.frequency_ghz,
              " GHz) does not admit the value 0 of the ", bits, "-bit grid (delay ", delay(bits, 0, p), " ns)");
    }
  }
  require(finite_nonnegative(switch_cost_ns), fn, "switch_cost_ns must be >= 0, got ", switch_cost_ns);
  require(finite_nonnegative(switch_energy_nj), fn, "switch_energy_nj must be >= 0, got ", switch_energy_nj);
  require(finite_nonnegative(static_power_w), fn, "static_power_w must be >= 0, got ", static_power_w);
  require(array_rows > 0 && array_cols > 0, fn, "mac_array must be two positive sizes, got ", array_rows, "x",
          array_cols);
  require(sparse.macs_per_cycle > 0, fn, "sparse_engine.macs_per_cycle must be > 0, got ", sparse.macs_per_cycle);
  require(finite_nonnegative(sparse.mac_energy_pj), fn, "sparse_engine.mac_energy_pj must be >= 0, got ",
          sparse.mac_energy_pj);
  require(finite_nonnegative(fp16_mac_pj), fn, "fp16_mac_pj must be >= 0, got ", fp16_mac_pj);
  require(finite_nonnegative(memory.bandwidth_gbps), fn, "memory.bandwidth_gbps must be >= 0, got ",
          memory.bandwidth_gbps);
  require(finite_nonnegative(memory.energy_pj_per_byte), fn, "memory.energy_pj_per_byte must be >= 0, got ",
          memory.energy_pj_per_byte);
  require(tile_rows > 0 && tile_cols > 0, fn, "tile must be two positive sizes, got ", tile_rows, "x", tile_cols);
}

const std::vector<double>& HardwareModel::delays(int bits, size_t point) const {
  require(bits == 4 || bits == 8, "HardwareModel.delays", "bits must be 4 or 8, got ", bits);
  const auto& tables = bits == 4 ? delay4 : delay8;
  require(point < tables.size(), "HardwareModel.delays", "point ", point, " out of range (", tables.size(),
          " points)");
  return tables[point];
}

double HardwareModel::delay(int bits, int value, size_t point) const {
  const auto& table = delays(bits, point);
  const int lo = grid_min(bits);
  require(value >= lo && value < lo + grid_size(bits), "HardwareModel.delay", "value ", value,
          " is outside the signed ", bits, "-bit grid");
  return table[value - lo];
}

const std::vector<double>& HardwareModel::energies(int bits) const {
  require(bits == 4 || bits == 8, "HardwareModel.energies", "bits must be 4 or 8, got ", bits);
  return bits == 4 ? energy4 : energy8;
}

double HardwareModel::mac_energy_pj(int bits, int value, size_t point) const {
  const auto& table = energies(bits);
  const int lo = grid_min(bits);
  require(value >= lo && value < lo + grid_size(bits), "HardwareModel.mac_energy_pj", "value ", value,
          " is outside the signed ", bits, "-bit grid");
  require(point < points.size(), "HardwareModel.mac_energy_pj", "point ", point, " out of range");
  return table[value - lo] * points[point].voltage * points[point].voltage;
}

std::vector<int> HardwareModel::admitted(int bits, size_t point) const {
  require(point < points.size(), "HardwareModel.admitted", "point ", point, " out of range (", points.size(),
          " points)");
  const auto& table = delays(bits, point);
  const double period = 1.0 / points[point].frequency_ghz;
  std::vector<int> values;
  for (int i = 0; i < grid_size(bits); ++i) {
    if (table[i] <= period) values.push_back(grid_min(bits) + i);
  }
  return values;
}

int HardwareModel::nominal_point(int bits) const {
  int best = -1;
  for (int p = 0; p < static_cast<int>(points.size()); ++p) {
    if (admitted(bits, p).size() != static_cast<size_t>(grid_size(bits))) continue;
    // Faster clock wins; at the same clock the lower voltage (listed first) wins.
    if (best < 0 || points[p].frequency_ghz > points[best].frequency_ghz) best = p;
  }
  return best;
}

std::vector<int> HardwareModel::ladder(Mode mode, int bits) const {
  int nominal = nominal_point(bits);
  if (nominal < 0) nominal = 0;  // no point admits the whole grid: start from the slowest
  std::vector<int> rungs{nominal};
  const double clock = points[nominal].frequency_ghz, volts = points[nominal].voltage;
  if (mode == Mode::performance) {
    // Ascending clock; at one clock the higher voltage first (its admitted set is the larger one).
    std::vector<int> faster;
    for (int p = 0; p < static_cast<int>(points.size()); ++p) {
      if (points[p].frequency_ghz > clock) faster.push_back(p);
    }
    std::stable_sort(faster.begin(), faster.end(), [&](int a, int b) {
      if (points[a].frequency_ghz != points[b].frequency_ghz) return points[a].frequency_ghz < points[b].frequency_ghz;
      return points[a].voltage > points[b].voltage;
    });
    rungs.insert(rungs.end(), faster.begin(), faster.end());
  } else {
    for (int p = static_cast<int>(points.size()) - 1; p >= 0; --p) {
      if (points[p].frequency_ghz == clock && points[p].voltage < volts) rungs.push_back(p);
    }
  }
  return rungs;
}

// ---- JSON -------------------------------------------------------------------------------------------------

std::string to_json(const HardwareModel& model) {
  Json doc;
  doc["schema"] = "halo.hwq.hardware_model";
  doc["version"] = kSchemaVersion;
  doc["delay_ns"] = {{"int4", model.delay4}, {"int8", model.delay8}};
  doc["energy_model"] = energy_model_name(model.energy_model);
  doc["energy_pj"] = {{"int4", model.energy4}, {"int8", model.energy8}};
  Json points = Json::array();
  for (const auto& p : model.points) {
    points.push_back({{"voltage", p.voltage},
                      {"frequency_ghz", p.frequency_ghz},
                      {"power_w", p.power_w},
                      {"leakage_w", p.leakage_w},
                      {"book_size", p.book_size}});
  }
  doc["operating_points"] = points;
  doc["switch_cost_ns"] = model.switch_cost_ns;
  doc["switch_energy_nj"] = model.switch_energy_nj;
  doc["static_power_w"] = model.static_power_w;
  doc["mac_array"] = {model.array_rows, model.array_cols};
  doc["sparse_engine"] = {{"macs_per_cycle", model.sparse.macs_per_cycle},
                          {"mac_energy_pj", model.sparse.mac_energy_pj}};
  doc["fp16_mac_pj"] = model.fp16_mac_pj;
  doc["memory"] = {{"bandwidth_gbps", model.memory.bandwidth_gbps},
                   {"energy_pj_per_byte", model.memory.energy_pj_per_byte}};
  doc["tile"] = {model.tile_rows, model.tile_cols};
  return doc.dump(2);
}

namespace {

// Field readers that name the field and the value they refuse (never a silent narrowing).
struct Reader {
  const char* fn;

  const Json& at(const Json& object, const std::string& key, const std::string& field) const {
    require(object.is_object(), fn, "'", field, "' must be a JSON object, got ", object.dump());
    const auto it = object.find(key);
    require(it != object.end(), fn, "field '", field.empty() ? key : field + "." + key, "' is missing");
    return *it;
  }

  double number(const Json& value, const std::string& field) const {
    require(value.is_number(), fn, "field '", field, "' must be a number, got ", value.dump());
    return value.get<double>();
  }

  int64_t integer(const Json& value, const std::string& field, int64_t lo, int64_t hi) const {
    bool ok = value.is_number_integer();
    int64_t result = 0;
    if (ok && value.is_number_unsigned()) {
      const uint64_t u = value.get<uint64_t>();
      ok = u <= static_cast<uint64_t>(hi);
      result = static_cast<int64_t>(u);
    } else if (ok) {
      result = value.get<int64_t>();
    }
    require(ok && result >= lo && result <= hi, fn, "field '", field, "' must be an integer in ", lo, "..", hi,
            ", got ", value.dump());
    return result;
  }

  std::vector<double> numbers(const Json& value, const std::string& field) const {
    require(value.is_array(), fn, "field '", field, "' must be a list of numbers, got ",
            value.dump().substr(0, 80));
    std::vector<double> out;
    out.reserve(value.size());
    for (size_t i = 0; i < value.size(); ++i) out.push_back(number(value[i], field + "[" + std::to_string(i) + "]"));
    return out;
  }

  std::pair<int, int> pair(const Json& value, const std::string& field, int64_t hi) const {
    require(value.is_array() && value.size() == 2, fn, "field '", field, "' must be [rows, cols], got ",
            value.dump().substr(0, 80));
    return {static_cast<int>(integer(value[0], field + "[0]", 1, hi)),
            static_cast<int>(integer(value[1], field + "[1]", 1, hi))};
  }

  void only(const Json& object, const std::string& field, std::initializer_list<const char*> allowed) const {
    require(object.is_object(), fn, "field '", field, "' must be a JSON object, got ", object.dump().substr(0, 80));
    const std::set<std::string> names(allowed.begin(), allowed.end());
    for (const auto& item : object.items()) {
      if (names.count(item.key())) continue;
      std::string list;
      for (const char* name : allowed) list += std::string(list.empty() ? "" : ", ") + name;
      fail(fn, "unknown field '", field.empty() ? item.key() : field + "." + item.key(), "' (expected ", list, ")");
    }
  }

  // delay_ns.intB: one table for every point, or one per point.
  std::vector<std::vector<double>> delay_tables(const Json& value, const std::string& field, size_t points,
                                                size_t size) const {
    require(value.is_array(), fn, "field '", field, "' must be a list, got ", value.dump().substr(0, 80));
    if (!value.empty() && value[0].is_array()) {
      require(value.size() == points, fn, "field '", field, "' holds ", value.size(),
              " per-point tables but there are ", points, " operating points");
      std::vector<std::vector<double>> tables;
      for (size_t p = 0; p < value.size(); ++p) tables.push_back(numbers(value[p], field + "[" + std::to_string(p) + "]"));
      return tables;
    }
    const std::vector<double> table = numbers(value, field);
    require(table.size() == size, fn, "field '", field, "' must hold ", size, " delays, got ", table.size());
    return std::vector<std::vector<double>>(points, table);
  }
};

}  // namespace

HardwareModel from_json(const std::string& text) {
  const char* fn = "HardwareModel.from_json";
  Json doc;
  try {
    doc = Json::parse(text);
  } catch (const Json::exception& error) {
    fail<FormatError>(fn, "not valid JSON: ", error.what());
  }
  const Reader read{fn};
  require(doc.is_object(), fn, "the document must be a JSON object");
  if (doc.contains("schema")) {
    require(doc.at("schema") == "halo.hwq.hardware_model", fn, "schema must be 'halo.hwq.hardware_model', got ",
            doc.at("schema").dump());
  }
  int version = 1;  // absent: the first schema, where the field was optional
  if (doc.contains("version")) version = static_cast<int>(read.integer(doc.at("version"), "version", 1, kSchemaVersion));
  if (version == 1) {
    read.only(doc, "", {"schema", "version", "delay_ns", "operating_points", "switch_cost_ns", "switch_energy_nj",
                        "static_power_w", "mac_array", "sparse_macs_per_cycle", "tile"});
  } else {
    read.only(doc, "", {"schema", "version", "delay_ns", "energy_model", "energy_pj", "activity", "mac_energy_pj",
                        "operating_points", "switch_cost_ns", "switch_energy_nj", "static_power_w", "mac_array",
                        "sparse_engine", "sparse_macs_per_cycle", "fp16_mac_pj", "memory", "tile"});
  }
  HardwareModel model;
  model.energy_model = version == 1 ? EnergyModel::power : EnergyModel::activity;
  if (doc.contains("energy_model")) {
    const Json& name = doc.at("energy_model");
    require(name == "activity" || name == "power", fn, "energy_model must be 'activity' or 'power', got ",
            name.dump());
    model.energy_model = name == "power" ? EnergyModel::power : EnergyModel::activity;
  }

  const Json& points = read.at(doc, "operating_points", "");
  require(points.is_array() && !points.empty(), fn, "field 'operating_points' must be a non-empty list, got ",
          points.dump().substr(0, 80));
  for (size_t p = 0; p < points.size(); ++p) {
    const std::string field = "operating_points[" + std::to_string(p) + "]";
    const Json& entry = points[p];
    require(entry.is_object(), fn, "field '", field, "' must be an object, got ", entry.dump());
    if (version == 1) {
      read.only(entry, field, {"voltage", "frequency_ghz", "power_w"});
    } else {
      read.only(entry, field, {"voltage", "frequency_ghz", "power_w", "leakage_w", "book_size"});
    }
    OperatingPoint point;
    point.voltage = read.number(read.at(entry, "voltage", field), field + ".voltage");
    point.frequency_ghz = read.number(read.at(entry, "frequency_ghz", field), field + ".frequency_ghz");
    if (model.energy_model == EnergyModel::power || entry.contains("power_w")) {
      point.power_w = read.number(read.at(entry, "power_w", field), field + ".power_w");
    }
    if (entry.contains("leakage_w")) point.leakage_w = read.number(entry.at("leakage_w"), field + ".leakage_w");
    if (entry.contains("book_size")) {
      point.book_size = static_cast<int>(read.integer(entry.at("book_size"), field + ".book_size", 1, 256));
    }
    model.points.push_back(point);
  }

  const Json& delays = read.at(doc, "delay_ns", "");
  read.only(delays, "delay_ns", {"int4", "int8"});
  model.delay4 = read.delay_tables(read.at(delays, "int4", "delay_ns"), "delay_ns.int4", model.points.size(), 16);
  model.delay8 = read.delay_tables(read.at(delays, "int8", "delay_ns"), "delay_ns.int8", model.points.size(), 256);

  require(!(doc.contains("energy_pj") && doc.contains("activity")), fn,
          "give either 'energy_pj' or 'activity' (with 'mac_energy_pj'), not both");
  model.energy4 = structural_energies(4);
  model.energy8 = structural_energies(8);
  if (doc.contains("energy_pj")) {
    const Json& energy = doc.at("energy_pj");
    read.only(energy, "energy_pj", {"int4", "int8"});
    model.energy4 = read.numbers(read.at(energy, "int4", "energy_pj"), "energy_pj.int4");
    model.energy8 = read.numbers(read.at(energy, "int8", "energy_pj"), "energy_pj.int8");
  } else if (doc.contains("activity")) {
    const Json& activity = doc.at("activity");
    read.only(activity, "activity", {"int4", "int8"});
    const double full = read.number(read.at(doc, "mac_energy_pj", ""), "mac_energy_pj");
    require(finite_nonnegative(full), fn, "mac_energy_pj must be >= 0, got ", full);
    model.energy4 = read.numbers(read.at(activity, "int4", "activity"), "activity.int4");
    model.energy8 = read.numbers(read.at(activity, "int8", "activity"), "activity.int8");
    for (auto* table : {&model.energy4, &model.energy8}) {
      for (double& a : *table) {
        require(std::isfinite(a) && a >= 0 && a <= 1, fn, "activity values must be in [0, 1], got ", a);
        a *= full;
      }
    }
  } else {
    require(!doc.contains("mac_energy_pj"), fn, "'mac_energy_pj' needs an 'activity' table");
  }

  model.switch_cost_ns = read.number(read.at(doc, "switch_cost_ns", ""), "switch_cost_ns");
  model.switch_energy_nj = read.number(read.at(doc, "switch_energy_nj", ""), "switch_energy_nj");
  model.static_power_w = read.number(read.at(doc, "static_power_w", ""), "static_power_w");
  std::tie(model.array_rows, model.array_cols) = read.pair(read.at(doc, "mac_array", ""), "mac_array", 1 << 20);
  std::tie(model.tile_rows, model.tile_cols) = read.pair(read.at(doc, "tile", ""), "tile", 1 << 20);

  require(!(doc.contains("sparse_macs_per_cycle") && doc.contains("sparse_engine")), fn,
          "give either 'sparse_macs_per_cycle' or 'sparse_engine', not both");
  if (doc.contains("sparse_engine")) {
    const Json& engine = doc.at("sparse_engine");
    read.only(engine, "sparse_engine", {"macs_per_cycle", "mac_energy_pj"});
    model.sparse.macs_per_cycle = static_cast<int>(
        read.integer(read.at(engine, "macs_per_cycle", "sparse_engine"), "sparse_engine.macs_per_cycle", 1, 1 << 30));
    if (engine.contains("mac_energy_pj")) {
      model.sparse.mac_energy_pj = read.number(engine.at("mac_energy_pj"), "sparse_engine.mac_energy_pj");
    }
  } else {
    model.sparse.macs_per_cycle = static_cast<int>(
        read.integer(read.at(doc, "sparse_macs_per_cycle", ""), "sparse_macs_per_cycle", 1, 1 << 30));
  }
  if (doc.contains("fp16_mac_pj")) model.fp16_mac_pj = read.number(doc.at("fp16_mac_pj"), "fp16_mac_pj");
  if (doc.contains("memory")) {
    const Json& memory = doc.at("memory");
    read.only(memory, "memory", {"bandwidth_gbps", "energy_pj_per_byte"});
    if (memory.contains("bandwidth_gbps")) {
      model.memory.bandwidth_gbps = read.number(memory.at("bandwidth_gbps"), "memory.bandwidth_gbps");
    }
    if (memory.contains("energy_pj_per_byte")) {
      model.memory.energy_pj_per_byte = read.number(memory.at("energy_pj_per_byte"), "memory.energy_pj_per_byte");
    }
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
