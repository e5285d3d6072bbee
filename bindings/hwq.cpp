// halo._core.hwq: HALO hardware model, quantizer, DVFS plan and RTN baseline.
// The hardware model crosses as its JSON text (the Python HardwareModel keeps it).
#include <optional>

#include "bindings/registry.hpp"
#include "halo/hwq/quantizer.hpp"

namespace halo::bindings {
namespace {

using namespace halo::hwq;

struct Matrix {
  const float* data;
  int64_t rows, cols;
};

Matrix float_matrix(const char* fn, const char* what, const py::buffer& buffer) {
  const BufferView view = contiguous_view(fn, what, buffer, 4);
  require<TypeMismatch>(view.info.format == py::format_descriptor<float>::format(), fn, what,
                        " must be float32, got format '", view.info.format, "'");
  require(view.info.ndim == 2, fn, what, " must be 2-D, got ", view.info.ndim, " dimensions");
  return {static_cast<const float*>(view.data), view.info.shape[0], view.info.shape[1]};
}

template <typename T>
py::array_t<T> to_array(const std::vector<T>& values) {
  py::array_t<T> out(values.size());
  std::copy(values.begin(), values.end(), out.mutable_data());
  return out;
}

py::dict estimate_dict(const Estimate& e) {
  py::dict d;
  d["latency_ns"] = e.latency_ns;
  d["energy_nj"] = e.energy_nj;
  d["baseline_latency_ns"] = e.baseline_latency_ns;
  d["baseline_energy_nj"] = e.baseline_energy_nj;
  d["speedup"] = e.speedup;
  d["energy_saving"] = e.energy_saving;
  d["average_bits"] = e.average_bits;
  d["baseline_bits"] = e.baseline_bits;
  return d;
}

void bind(py::module_& m) {
  m.def("default_model", [] { return to_json(HardwareModel::default_model()); },
        "The default hardware model as JSON text.");
  m.def("normalize_model", [](const std::string& text) { return to_json(from_json(text)); }, py::arg("text"),
        "Parses and validates a hardware model; returns it re-serialised.");
  m.def("active_rows", &active_rows, py::arg("value"));
  m.def("bit_span", &bit_span, py::arg("value"));
  m.def(
      "structural_delay",
      [](int value, int bits) {
        require(bits == 4 || bits == 8, "structural_delay", "bits must be 4 or 8, got ", bits);
        return structural_delay(value, default_coefficients(bits));
      },
      py::arg("value"), py::arg("bits"));
  m.def(
      "code_book", [](const std::string& text, int bits, int point) {
        require(point >= 0, "code_book", "point must be >= 0, got ", point);
        return from_json(text).code_book(bits, static_cast<size_t>(point));
      },
      py::arg("model"), py::arg("bits"), py::arg("point"));
  m.def("nominal_point", [](const std::string& text, int bits) { return from_json(text).nominal_point(bits); },
        py::arg("model"), py::arg("bits"));
  m.def(
      "plan_dvfs",
      [](const std::string& text, const std::vector<int>& wanted, const std::vector<int64_t>& macs, int max_switches) {
        const Plan plan = plan_dvfs(wanted, macs, from_json(text), max_switches);
        return py::make_tuple(plan.order, plan.point, plan.switches);
      },
      py::arg("model"), py::arg("wanted"), py::arg("macs"), py::arg("max_switches"));
  m.def(
      "quantize",
      [](const py::buffer& weights, const std::optional<py::buffer>& sensitivity, const std::string& text, int bits,
         int64_t tile_rows, int64_t tile_cols, double salient_fraction, double outlier_sigma, int max_switches,
         bool channel_scales, const std::vector<double>& tier_fractions, int64_t tokens, const std::string& backend) {
        const char* fn = "halo_quantize";
        const Matrix w = float_matrix(fn, "weights", weights);
        const float* s = nullptr;
        if (sensitivity) {
          const Matrix sm = float_matrix(fn, "sensitivity", *sensitivity);
          require(sm.rows == w.rows && sm.cols == w.cols, fn, "sensitivity shape ", sm.rows, "x", sm.cols,
                  " differs from the weights' ", w.rows, "x", w.cols);
          s = sm.data;
        }
        const HardwareModel model = from_json(text);
        QuantizeOptions options;
        options.bits = bits;
        options.tile_rows = tile_rows;
        options.tile_cols = tile_cols;
        options.salient_fraction = salient_fraction;
        options.outlier_sigma = outlier_sigma;
        options.max_switches = max_switches;
        options.channel_scales = channel_scales;
        options.tier_fractions = tier_fractions;
        options.tokens = tokens;
        options.backend = parse_backend(backend);
        Quantized q;
        Estimate e;
        {
          py::gil_scoped_release release;
          q = halo_quantize(w.data, s, w.rows, w.cols, model, options);
          e = estimate(q, model);
        }
        py::dict out;
        py::array_t<int8_t> codes({w.rows, w.cols});
        std::copy(q.codes.begin(), q.codes.end(), codes.mutable_data());
        py::array_t<float> scales({w.rows, q.grid.grid_cols()});
        std::copy(q.scales.begin(), q.scales.end(), scales.mutable_data());
        out["codes"] = codes;
        out["scales"] = scales;
        out["tile_rows"] = q.grid.tile_rows;
        out["tile_cols"] = q.grid.tile_cols;
        out["wanted_point"] = q.wanted_point;
        out["plan_order"] = q.plan.order;
        out["plan_point"] = q.plan.point;
        out["switches"] = q.plan.switches;
        out["tile_error"] = q.tile_error;
        out["indptr"] = to_array(q.sparse.indptr);
        out["indices"] = to_array(q.sparse.indices);
        out["values"] = to_array(q.sparse.values);
        out["estimate"] = estimate_dict(e);
        return out;
      },
      py::arg("weights"), py::arg("sensitivity"), py::arg("model"), py::arg("bits"), py::arg("tile_rows"),
      py::arg("tile_cols"), py::arg("salient_fraction"), py::arg("outlier_sigma"), py::arg("max_switches"),
      py::arg("channel_scales"), py::arg("tier_fractions"), py::arg("tokens"), py::arg("backend") = "auto",
      "Runs the HALO quantizer on a float32 (rows, cols) matrix; returns a dict of arrays and the estimate.");
  m.def(
      "dequantize",
      [](const py::buffer& codes, const py::buffer& scales, int64_t tile_cols, const py::buffer& indptr,
         const py::buffer& indices, const py::buffer& values) {
        const char* fn = "HaloQuantized.dequantize";
        const BufferView code_view = contiguous_view(fn, "codes", codes, 1);
        const BufferView scale_view = contiguous_view(fn, "scales", scales, 4);
        const BufferView ptr_view = contiguous_view(fn, "indptr", indptr, 8);
        const BufferView index_view = contiguous_view(fn, "indices", indices, 4);
        const BufferView value_view = contiguous_view(fn, "values", values, 4);
        require(code_view.info.ndim == 2, fn, "codes must be 2-D");
        Quantized q;
        const int64_t rows = code_view.info.shape[0], cols = code_view.info.shape[1];
        require(tile_cols >= 1, fn, "tile_cols must be >= 1, got ", tile_cols);
        q.grid = {rows, cols, 1, std::min(tile_cols, cols)};
        require(scale_view.count == rows * q.grid.grid_cols(), fn, "scales holds ", scale_view.count,
                " values, expected ", rows * q.grid.grid_cols());
        require(ptr_view.count == rows + 1, fn, "indptr holds ", ptr_view.count, " entries, expected ", rows + 1);
        require(index_view.count == value_view.count, fn, "indices and values differ in length");
        const auto* ptr = static_cast<const int64_t*>(ptr_view.data);
        const auto* idx = static_cast<const int32_t*>(index_view.data);
        require(ptr[0] == 0 && ptr[rows] == value_view.count, fn, "indptr does not cover the values");
        for (int64_t r = 0; r < rows; ++r) require(ptr[r] <= ptr[r + 1], fn, "indptr decreases at row ", r);
        for (int64_t k = 0; k < index_view.count; ++k)
          require(idx[k] >= 0 && idx[k] < cols, fn, "column index ", idx[k], " out of range");
        q.codes.assign(static_cast<const int8_t*>(code_view.data), static_cast<const int8_t*>(code_view.data) + rows * cols);
        q.scales.assign(static_cast<const float*>(scale_view.data), static_cast<const float*>(scale_view.data) + scale_view.count);
        q.sparse.rows = rows;
        q.sparse.cols = cols;
        q.sparse.indptr.assign(ptr, ptr + rows + 1);
        q.sparse.indices.assign(idx, idx + index_view.count);
        q.sparse.values.assign(static_cast<const float*>(value_view.data),
                               static_cast<const float*>(value_view.data) + value_view.count);
        py::array_t<float> out({rows, cols});
        float* out_ptr = out.mutable_data();
        {
          py::gil_scoped_release release;
          dequantize(q, out_ptr);
        }
        return out;
      },
      py::arg("codes"), py::arg("scales"), py::arg("tile_cols"), py::arg("indptr"), py::arg("indices"),
      py::arg("values"));
  m.def(
      "rtn_quantize",
      [](const py::buffer& weights, int bits, int64_t group_size) {
        const Matrix w = float_matrix("rtn_quantize", "weights", weights);
        const int64_t group = group_size <= 0 ? w.cols : std::min(group_size, w.cols);
        const int64_t groups = (w.cols + group - 1) / group;
        py::array_t<int8_t> codes({w.rows, w.cols});
        py::array_t<float> scales({w.rows, groups});
        int8_t* code_ptr = codes.mutable_data();
        float* scale_ptr = scales.mutable_data();
        {
          py::gil_scoped_release release;
          rtn_quantize(w.data, w.rows, w.cols, bits, group, code_ptr, scale_ptr);
        }
        return py::make_tuple(codes, scales);
      },
      py::arg("weights"), py::arg("bits"), py::arg("group_size"));
}

Registrar registrar("hwq", bind);

}  // namespace
}  // namespace halo::bindings
