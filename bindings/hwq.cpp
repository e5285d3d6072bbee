// halo._core.hwq: HALO hardware model, quantizer, DVFS plan, estimate and RTN baseline.
// HardwareModel and Quantized cross as C++ objects held by Python (parsed and validated once).
#include <optional>

#include "bindings/registry.hpp"
#include "halo/hwq/codebook.hpp"
#include "halo/hwq/quantizer.hpp"

namespace halo::bindings {
namespace {

using namespace halo::hwq;

struct Matrix {
  const float* data;
  int64_t rows, cols;
};

Matrix float_matrix(const char* fn, const char* what, const py::buffer& buffer) {
  const BufferView view = typed_view(fn, what, buffer, Format::f32);
  require(view.info.ndim == 2, fn, what, " must be 2-D, got ", view.info.ndim, " dimensions");
  return {static_cast<const float*>(view.data), view.info.shape[0], view.info.shape[1]};
}

const float* float_vector(const char* fn, const char* what, const py::buffer& buffer, int64_t& count) {
  const BufferView view = typed_view(fn, what, buffer, Format::f32);
  count = view.count;
  return static_cast<const float*>(view.data);
}

// A NumPy view of a vector owned by `owner` (kept alive by the view).
template <typename T>
py::array view(const std::vector<T>& values, std::vector<py::ssize_t> shape, const py::object& owner) {
  return py::array_t<T>(shape, values.data(), owner);
}

py::dict cost_dict(const Cost& c) {
  py::dict d;
  d["latency_ns"] = c.latency_ns;
  d["energy_nj"] = c.energy_nj;
  d["compute_ns"] = c.compute_ns;
  d["memory_ns"] = c.memory_ns;
  d["dynamic_nj"] = c.dynamic_nj;
  d["leakage_nj"] = c.leakage_nj;
  d["memory_nj"] = c.memory_nj;
  d["static_nj"] = c.static_nj;
  d["bits"] = c.bits;
  return d;
}

py::dict estimate_dict(const Estimate& e) {
  py::dict d;
  d["halo"] = cost_dict(e.halo);
  d["uniform"] = cost_dict(e.uniform);
  d["w8a8"] = cost_dict(e.w8a8);
  d["fp16"] = cost_dict(e.fp16);
  d["switch_ns"] = e.switch_ns;
  d["switch_nj"] = e.switch_nj;
  d["sparse_ns"] = e.sparse_ns;
  d["sparse_nj"] = e.sparse_nj;
  d["sparse_point"] = e.sparse_point;
  d["nominal_point"] = e.nominal_point;
  d["tokens"] = e.tokens;
  return d;
}

py::dict point_dict(const OperatingPoint& p) {
  py::dict d;
  d["voltage"] = p.voltage;
  d["frequency_ghz"] = p.frequency_ghz;
  d["power_w"] = p.power_w;
  d["leakage_w"] = p.leakage_w;
  d["book_size"] = p.book_size;
  return d;
}

void bind_model(py::module_& m) {
  py::class_<HardwareModel>(m, "HardwareModel", "A validated hardware model (see halo.HardwareModel).")
      .def_static("from_json", &from_json, py::arg("text"), "Parses and validates a version 1 or 2 JSON document.")
      .def_static("default", &HardwareModel::default_model)
      .def("to_json", [](const HardwareModel& h) { return to_json(h); })
      .def_property_readonly("num_points", [](const HardwareModel& h) { return h.points.size(); })
      .def_property_readonly("energy_model", [](const HardwareModel& h) { return energy_model_name(h.energy_model); })
      .def("point", [](const HardwareModel& h, int point) {
        require(point >= 0 && point < static_cast<int>(h.points.size()), "HardwareModel.point", "point ", point,
                " out of range (", h.points.size(), " points)");
        return point_dict(h.points[point]);
      }, py::arg("point"))
      .def("admitted", [](const HardwareModel& h, int bits, int point) {
        require(bits == 4 || bits == 8, "HardwareModel.admitted", "bits must be 4 or 8, got ", bits);
        require(point >= 0, "HardwareModel.admitted", "point must be >= 0, got ", point);
        return h.admitted(bits, static_cast<size_t>(point));
      }, py::arg("bits"), py::arg("point"))
      .def("delays", [](const HardwareModel& h, int bits, int point) {
        require(point >= 0, "HardwareModel.delays", "point must be >= 0, got ", point);
        return h.delays(bits, static_cast<size_t>(point));
      }, py::arg("bits"), py::arg("point"))
      .def("energies", &HardwareModel::energies, py::arg("bits"))
      .def("nominal_point", [](const HardwareModel& h, int bits) {
        require(bits == 4 || bits == 8, "HardwareModel.nominal_point", "bits must be 4 or 8, got ", bits);
        return h.nominal_point(bits);
      }, py::arg("bits"))
      .def("ladder", [](const HardwareModel& h, const std::string& mode, int bits) {
        require(bits == 4 || bits == 8, "HardwareModel.ladder", "bits must be 4 or 8, got ", bits);
        return h.ladder(parse_mode(mode), bits);
      }, py::arg("mode"), py::arg("bits"));
}

void bind_quantized(py::module_& m) {
  py::class_<Quantized>(m, "Quantized", "The C++ result of halo_quantize (see halo.HaloQuantized).")
      .def_property_readonly("shape", [](const Quantized& q) { return py::make_tuple(q.grid.rows, q.grid.cols); })
      .def_property_readonly("tile_shape",
                             [](const Quantized& q) { return py::make_tuple(q.grid.tile_rows, q.grid.tile_cols); })
      .def_property_readonly("grid", [](const Quantized& q) { return grid_mode_name(q.grid_mode); })
      .def_property_readonly("mode", [](const Quantized& q) { return mode_name(q.mode); })
      .def_property_readonly("bits", [](const Quantized& q) { return q.bits; })
      .def_property_readonly("channel_scales", [](const Quantized& q) { return q.channel_scales; })
      .def_property_readonly("sparse_dtype", [](const Quantized& q) { return q.sparse_fp16 ? "float16" : "float32"; })
      .def_property_readonly("tokens", [](const Quantized& q) { return q.tokens; })
      .def_property_readonly("ladder", [](const Quantized& q) { return q.ladder; })
      .def_property_readonly("books", [](const Quantized& q) { return q.books; })
      .def_property_readonly("switches", [](const Quantized& q) { return q.plan.switches; })
      .def_property_readonly("uniform_bits", [](const Quantized& q) { return q.uniform_bits; })
      .def_property_readonly("codes", [](const py::object& self) {
        const auto& q = self.cast<const Quantized&>();
        return view(q.codes, {q.grid.rows, q.grid.cols}, self);
      })
      .def_property_readonly("scales", [](const py::object& self) {
        const auto& q = self.cast<const Quantized&>();
        return view(q.scales, {q.grid.rows, q.grid.grid_cols()}, self);
      })
      .def_property_readonly("plan_order", [](const py::object& self) {
        const auto& q = self.cast<const Quantized&>();
        return view(q.plan.order, {static_cast<py::ssize_t>(q.plan.order.size())}, self);
      })
      .def_property_readonly("plan_point", [](const py::object& self) {
        const auto& q = self.cast<const Quantized&>();
        return view(q.plan.point, {static_cast<py::ssize_t>(q.plan.point.size())}, self);
      })
      .def_property_readonly("wanted_point", [](const py::object& self) {
        const auto& q = self.cast<const Quantized&>();
        return view(q.wanted_point, {static_cast<py::ssize_t>(q.wanted_point.size())}, self);
      })
      .def_property_readonly("tile_error", [](const py::object& self) {
        const auto& q = self.cast<const Quantized&>();
        return view(q.tile_error, {static_cast<py::ssize_t>(q.tile_error.size())}, self);
      })
      .def_property_readonly("tile_score", [](const py::object& self) {
        const auto& q = self.cast<const Quantized&>();
        return view(q.tile_score, {static_cast<py::ssize_t>(q.tile_score.size())}, self);
      })
      .def_property_readonly("indptr", [](const py::object& self) {
        const auto& q = self.cast<const Quantized&>();
        return view(q.sparse.indptr, {static_cast<py::ssize_t>(q.sparse.indptr.size())}, self);
      })
      .def_property_readonly("indices", [](const py::object& self) {
        const auto& q = self.cast<const Quantized&>();
        return view(q.sparse.indices, {static_cast<py::ssize_t>(q.sparse.indices.size())}, self);
      })
      .def_property_readonly("values", [](const py::object& self) {
        const auto& q = self.cast<const Quantized&>();
        return view(q.sparse.values, {static_cast<py::ssize_t>(q.sparse.values.size())}, self);
      });
}

void bind(py::module_& m) {
  bind_model(m);
  bind_quantized(m);
  m.def("active_rows", &active_rows, py::arg("value"));
  m.def("bit_span", &bit_span, py::arg("value"));
  m.def("voltage_delay_factor", &voltage_delay_factor, py::arg("voltage"));
  m.def("structural_energy_pj", &structural_energy_pj, py::arg("value"));
  m.def(
      "structural_delay",
      [](int value, int bits) {
        require(bits == 4 || bits == 8, "structural_delay", "bits must be 4 or 8, got ", bits);
        return structural_delay(value, default_coefficients(bits));
      },
      py::arg("value"), py::arg("bits"));
  m.def(
      "plan_dvfs",
      [](const HardwareModel& model, const std::vector<int>& wanted, const std::vector<int64_t>& macs,
         int max_switches, const std::string& mode, int bits) {
        const Plan plan = plan_dvfs(wanted, macs, model, max_switches, parse_mode(mode), bits);
        return py::make_tuple(plan.order, plan.point, plan.switches);
      },
      py::arg("model"), py::arg("wanted"), py::arg("macs"), py::arg("max_switches"), py::arg("mode"),
      py::arg("bits"));
  m.def(
      "quantize",
      [](const py::buffer& weights, const std::optional<py::buffer>& sensitivity, const HardwareModel& model,
         const std::string& grid, const std::string& mode, const std::string& assign, const std::string& preset,
         const std::vector<double>& split, const std::vector<double>& tier_fractions, int64_t tile_rows,
         int64_t tile_cols, double salient_fraction, double outlier_sigma, const std::string& sparse_dtype,
         int max_switches, bool channel_scales,
         int book_iterations, double energy_weight, int64_t tokens, const std::string& backend) {
        const char* fn = "halo_quantize";
        const Matrix w = float_matrix(fn, "weights", weights);
        const float* s = nullptr;
        if (sensitivity) {
          const Matrix sm = float_matrix(fn, "sensitivity", *sensitivity);
          require(sm.rows == w.rows && sm.cols == w.cols, fn, "sensitivity shape ", sm.rows, "x", sm.cols,
                  " differs from the weights' ", w.rows, "x", w.cols);
          s = sm.data;
        }
        QuantizeOptions options;
        options.grid = parse_grid_mode(grid);
        options.mode = parse_mode(mode);
        options.assign = parse_assign(assign);
        options.preset = parse_preset(preset);
        options.split = split;
        options.tier_fractions = tier_fractions;
        options.tile_rows = tile_rows;
        options.tile_cols = tile_cols;
        options.salient_fraction = salient_fraction;
        options.outlier_sigma = outlier_sigma;
        require(sparse_dtype == "float16" || sparse_dtype == "float32", fn,
                "sparse_dtype must be 'float16' or 'float32', got '", sparse_dtype, "'");
        options.sparse_fp16 = sparse_dtype == "float16";
        options.max_switches = max_switches;
        options.channel_scales = channel_scales;
        options.book_iterations = book_iterations;
        options.energy_weight = energy_weight;
        options.tokens = tokens;
        options.backend = parse_backend(backend);
        py::gil_scoped_release release;
        return halo_quantize(w.data, s, w.rows, w.cols, model, options);
      },
      py::arg("weights"), py::arg("sensitivity"), py::arg("model"), py::arg("grid"), py::arg("mode"),
      py::arg("assign"), py::arg("preset"), py::arg("split"), py::arg("tier_fractions"), py::arg("tile_rows"),
      py::arg("tile_cols"), py::arg("salient_fraction"), py::arg("outlier_sigma"), py::arg("sparse_dtype"),
      py::arg("max_switches"),
      py::arg("channel_scales"), py::arg("book_iterations"), py::arg("energy_weight"), py::arg("tokens"),
      py::arg("backend"),
      "Runs the HALO quantizer on a float32 (rows, cols) matrix.");
  m.def(
      "dequantize",
      [](const Quantized& q) {
        py::array_t<float> out({q.grid.rows, q.grid.cols});
        float* out_ptr = out.mutable_data();
        {
          py::gil_scoped_release release;
          dequantize(q, out_ptr);
        }
        return out;
      },
      py::arg("quantized"));
  m.def(
      "estimate",
      [](const Quantized& q, const HardwareModel& model, int64_t tokens) {
        Estimate e;
        {
          py::gil_scoped_release release;
          e = estimate(q, model, tokens);
        }
        return estimate_dict(e);
      },
      py::arg("quantized"), py::arg("model"), py::arg("tokens") = 0);
  m.def("stored_bits", &stored_bits, py::arg("quantized"));
  m.def(
      "fit_scale",
      [](const py::buffer& x, const py::buffer& s, const std::vector<float>& book, const std::string& backend) {
        int64_t count = 0, weights = 0;
        const float* xp = float_vector("fit_scale", "x", x, count);
        const float* sp = float_vector("fit_scale", "s", s, weights);
        require(count == weights, "fit_scale", "x has ", count, " values but s has ", weights);
        const Backend b = parse_backend(backend);
        ScaleFit fit{};
        {
          py::gil_scoped_release release;
          fit = fit_scale(xp, sp, count, book, b);
        }
        return py::make_tuple(fit.scale, fit.error);
      },
      py::arg("x"), py::arg("s"), py::arg("book"), py::arg("backend"));
  m.def(
      "best_book",
      [](const py::buffer& ratios, const py::buffer& weights, const std::vector<int>& admitted, int size) {
        int64_t count = 0, weight_count = 0;
        const float* r = float_vector("best_book", "ratios", ratios, count);
        const float* w = float_vector("best_book", "weights", weights, weight_count);
        require(count == weight_count, "best_book", "ratios has ", count, " values but weights has ", weight_count);
        WeightedHistogram histogram;
        for (int64_t i = 0; i < count; ++i) histogram.add(r[i], w[i]);
        return best_book(histogram, admitted, size);
      },
      py::arg("ratios"), py::arg("weights"), py::arg("admitted"), py::arg("size"));
  m.def(
      "rtn_quantize",
      [](const py::buffer& weights, int bits, int64_t group_size) {
        const Matrix w = float_matrix("rtn_quantize", "weights", weights);
        const int64_t groups = rtn_groups(w.rows, w.cols, bits, group_size);  // validates before any division
        py::array_t<int8_t> codes({w.rows, w.cols});
        py::array_t<float> scales({w.rows, groups});
        int8_t* code_ptr = codes.mutable_data();
        float* scale_ptr = scales.mutable_data();
        {
          py::gil_scoped_release release;
          rtn_quantize(w.data, w.rows, w.cols, bits, group_size, code_ptr, scale_ptr);
        }
        return py::make_tuple(codes, scales);
      },
      py::arg("weights"), py::arg("bits"), py::arg("group_size"));
}

Registrar registrar("hwq", bind);

}  // namespace
}  // namespace halo::bindings
