// halo._core.cuda: kernels on device pointers (torch CUDA tensors' data_ptr())
// and the caller's CUDA stream, so CUDA tensors never leave the GPU. The library's
// *_device entry points check the arguments and go through the kernel registry, which
// raises BackendUnavailable naming the operation where CUDA is not available.
#include "bindings/registry.hpp"
#include "halo/backend/backend.hpp"
#include "halo/optim/adamw8bit.hpp"
#include "halo/quant/quant4.hpp"

namespace halo::bindings {
namespace {

template <typename T>
T* pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void bind(py::module_& m) {
  m.def("compiled", &built_with_cuda);
  m.def(
      "quantize_4bit",
      [](uintptr_t input, const std::string& dtype, int64_t n, const std::string& quant_type, int64_t blocksize,
         uintptr_t packed, uintptr_t absmax, uintptr_t stream) {
        const char* fn = "cuda.quantize_4bit";
        const Format input_dtype = parse_kernel_float(fn, dtype);
        const Format type = parse_bnb4(fn, quant_type);
        py::gil_scoped_release release;
        quantize_4bit_device(pointer<const void>(input), input_dtype, n, type, blocksize, pointer<uint8_t>(packed),
                             pointer<float>(absmax), stream);
      },
      py::arg("input"), py::arg("dtype"), py::arg("n"), py::arg("quant_type"), py::arg("blocksize"),
      py::arg("packed"), py::arg("absmax"), py::arg("stream"));
  m.def(
      "dequantize_4bit",
      [](uintptr_t packed, uintptr_t absmax, int64_t n, const std::string& quant_type, int64_t blocksize,
         uintptr_t output, const std::string& dtype, uintptr_t stream) {
        const char* fn = "cuda.dequantize_4bit";
        const Format out_dtype = parse_kernel_float(fn, dtype);
        const Format type = parse_bnb4(fn, quant_type);
        py::gil_scoped_release release;
        dequantize_4bit_device(pointer<const uint8_t>(packed), pointer<const float>(absmax), n, type, blocksize,
                               pointer<void>(output), out_dtype, stream);
      },
      py::arg("packed"), py::arg("absmax"), py::arg("n"), py::arg("quant_type"), py::arg("blocksize"),
      py::arg("output"), py::arg("dtype"), py::arg("stream"));
  m.def(
      "adamw8bit_step",
      [](uintptr_t param, uintptr_t grad, const std::string& dtype, int64_t n, uintptr_t state1, uintptr_t state2,
         uintptr_t absmax1, uintptr_t absmax2, float lr, float beta1, float beta2, float eps, float weight_decay,
         int64_t step, float gnorm_scale, uintptr_t stream) {
        const AdamW8bitSettings s{lr, beta1, beta2, eps, weight_decay, step, gnorm_scale};
        const Format param_dtype = parse_kernel_float("cuda.adamw8bit_step", dtype);
        py::gil_scoped_release release;
        adamw8bit_step_device(pointer<void>(param), pointer<const void>(grad), param_dtype, n, pointer<uint8_t>(state1),
                              pointer<uint8_t>(state2), pointer<float>(absmax1), pointer<float>(absmax2), s, stream);
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("n"), py::arg("state1"), py::arg("state2"),
      py::arg("absmax1"), py::arg("absmax2"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("step"), py::arg("gnorm_scale"), py::arg("stream"));
}

Registrar registrar("cuda", bind);

}  // namespace
}  // namespace halo::bindings
