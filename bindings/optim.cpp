// halo._core.optim: the 8-bit AdamW step on CPU buffers (NumPy views of torch
// tensors) and the dynamic maps its states use.
#include "bindings/registry.hpp"
#include "halo/optim/adamw8bit.hpp"

namespace halo::bindings {
namespace {

AdamW8bitSettings settings_from(float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step,
                                float gnorm_scale) {
  AdamW8bitSettings s;
  s.lr = lr;
  s.beta1 = beta1;
  s.beta2 = beta2;
  s.eps = eps;
  s.weight_decay = weight_decay;
  s.step = step;
  s.gnorm_scale = gnorm_scale;
  return s;
}

void bind(py::module_& m) {
  m.def(
      "adamw8bit_step",
      [](const py::buffer& param, const py::buffer& grad, const std::string& dtype_name, const py::buffer& state1,
         const py::buffer& state2, const py::buffer& absmax1, const py::buffer& absmax2, float lr, float beta1,
         float beta2, float eps, float weight_decay, int64_t step, float gnorm_scale, const std::string& backend) {
        const char* fn = "adamw8bit_step";
        const Format dtype = parse_kernel_float(fn, dtype_name);
        BufferView p = typed_view(fn, "param", param, dtype, /*writable=*/true);
        const BufferView g = typed_view(fn, "grad", grad, dtype);
        BufferView s1 = typed_view(fn, "state1", state1, Format::u8, true);
        BufferView s2 = typed_view(fn, "state2", state2, Format::u8, true);
        BufferView a1 = typed_view(fn, "absmax1", absmax1, Format::f32, true);
        BufferView a2 = typed_view(fn, "absmax2", absmax2, Format::f32, true);
        const int64_t n = p.count;
        const int64_t blocks = (n + kOptimizerBlocksize - 1) / kOptimizerBlocksize;
        require(g.count == n, fn, "grad holds ", g.count, " elements, param ", n);
        require(s1.count == n && s2.count == n, fn, "state1/state2 hold ", s1.count, "/", s2.count,
                " codes, expected ", n);
        require(a1.count == blocks && a2.count == blocks, fn, "absmax1/absmax2 hold ", a1.count, "/", a2.count,
                " values, expected ", blocks);
        const AdamW8bitSettings s = settings_from(lr, beta1, beta2, eps, weight_decay, step, gnorm_scale);
        const Backend chosen = parse_backend(backend);
        py::gil_scoped_release release;
        adamw8bit_step(p.data, g.data, dtype, n, static_cast<uint8_t*>(s1.data), static_cast<uint8_t*>(s2.data),
                       static_cast<float*>(a1.data), static_cast<float*>(a2.data), s, chosen);
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("state1"), py::arg("state2"), py::arg("absmax1"),
      py::arg("absmax2"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
      py::arg("step"), py::arg("gnorm_scale") = 1.0f, py::arg("backend") = "auto",
      "One AdamW step with blockwise 8-bit states (bitsandbytes' layout), in place.");

  m.def("dynamic_map_unsigned", [] {
    py::array_t<float> out(256);
    std::copy(dynamic_map_unsigned().begin(), dynamic_map_unsigned().end(), out.mutable_data());
    return out;
  }, "bitsandbytes' unsigned 8-bit dynamic map (create_dynamic_map(signed=False)).");
  m.attr("BLOCKSIZE") = kOptimizerBlocksize;
}

Registrar registrar("optim", bind);

}  // namespace
}  // namespace halo::bindings
