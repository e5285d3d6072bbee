#include <optional>

#include "bindings/array_cache.hpp"
#include "bindings/registry.hpp"
#include "halo/core/reduce.hpp"
#include "halo/quant/codebook4.hpp"
#include "halo/quant/matmul4.hpp"
#include "halo/quant/quant4.hpp"

namespace halo::bindings {
namespace {

// ---- matmul_4bit: argument translation only (checks and behaviour in src/quant/matmul4.cpp) ----

Quant4Matrix matrix_view(const char* fn, const py::buffer& packed, const py::buffer& absmax,
                         const std::string& quant_type, int64_t blocksize, int64_t out_features, int64_t in_features) {
  const Format type = parse_bnb4(fn, quant_type);
  const BufferView codes = typed_view(fn, "packed", packed, Format::u8);
  const BufferView scales = typed_view(fn, "absmax", absmax, Format::f32);
  return quant4_matrix(fn, static_cast<const uint8_t*>(codes.data), codes.count,
                       static_cast<const float*>(scales.data), scales.count, type, blocksize, out_features,
                       in_features);
}

py::object matmul(const py::buffer& x, const std::string& dtype_name, int64_t rows, const py::buffer& packed,
                  const py::buffer& absmax, const std::string& quant_type, int64_t blocksize, int64_t out_features,
                  int64_t in_features, const std::optional<py::buffer>& bias, bool transposed,
                  const std::string& backend, const std::optional<py::buffer>& out, const std::string& activations) {
  const char* fn = transposed ? "matmul_4bit_transposed" : "matmul_4bit";
  const Format dtype = parse_kernel_float(fn, dtype_name);
  const Backend chosen = parse_backend(backend);
  const Activations mode = parse_activations(fn, activations);
  require(!transposed || mode == Activations::exact, fn, "int8 activations are for matmul_4bit only");
  const Quant4Matrix w = matrix_view(fn, packed, absmax, quant_type, blocksize, out_features, in_features);
  const BufferView input = typed_view(fn, "x", x, dtype);
  std::optional<BufferView> bias_view, target;
  if (bias) bias_view = typed_view(fn, "bias", *bias, dtype);
  if (out) target = typed_view(fn, "out", *out, dtype, /*writable=*/true);
  check_matmul_4bit_buffers(fn, rows, w, transposed, input.count, bias_view ? bias_view->count : -1,
                            target ? target->count : -1);
  py::object result =
      out ? py::object(*out) : py::object(cached_array(dtype, rows * (transposed ? in_features : out_features)));
  void* y_ptr = target ? target->data : py::array(result).mutable_data();
  const void* bias_ptr = bias_view ? bias_view->data : nullptr;
  {
    py::gil_scoped_release release;
    if (transposed)
      matmul_4bit_transposed(input.data, dtype, rows, w, y_ptr, chosen);
    else
      matmul_4bit(input.data, dtype, rows, w, bias_ptr, y_ptr, chosen, mode);
  }
  return result;
}

py::array_t<float> float_array(const float* data, size_t count) {
  py::array_t<float> out(count);
  std::copy(data, data + count, out.mutable_data());
  return out;
}

void bind(py::module_& m) {
  m.def(
      "quantize_4bit",
      [](const py::buffer& input, const std::string& dtype_name, const std::string& quant_type, int64_t blocksize,
         const std::string& backend) {
        const char* fn = "quantize_4bit";
        const Format dtype = parse_kernel_float(fn, dtype_name);
        const BufferView view = typed_view(fn, "input", input, dtype);
        const Format type = parse_bnb4(fn, quant_type);
        const Backend chosen = parse_backend(backend);
        const Quant4Sizes sizes = quant4_sizes(fn, view.count, type, blocksize);
        py::array_t<uint8_t> packed(sizes.packed_bytes);
        py::array_t<float> absmax(sizes.absmax_count);
        uint8_t* packed_ptr = packed.mutable_data();
        float* absmax_ptr = absmax.mutable_data();
        {
          py::gil_scoped_release release;
          quantize_4bit(view.data, dtype, view.count, type, blocksize, packed_ptr, absmax_ptr, chosen);
        }
        return py::make_tuple(packed, absmax);
      },
      py::arg("input"), py::arg("dtype"), py::arg("quant_type"), py::arg("blocksize"), py::arg("backend"),
      "Flat 4-bit quantization: returns (packed uint8[(n+1)//2], absmax float32[blocks]).");

  m.def(
      "dequantize_4bit",
      [](const py::buffer& packed, const py::buffer& absmax, int64_t n, const std::string& quant_type,
         int64_t blocksize, const std::string& dtype_name, const std::string& backend, std::optional<py::buffer> out) {
        const char* fn = "dequantize_4bit";
        const Format dtype = parse_kernel_float(fn, dtype_name);
        const Format type = parse_bnb4(fn, quant_type);
        const Backend chosen = parse_backend(backend);
        const BufferView codes = typed_view(fn, "packed", packed, Format::u8);
        const BufferView scales = typed_view(fn, "absmax", absmax, Format::f32);
        check_quant4_buffers(fn, n, type, blocksize, codes.count, scales.count);
        py::object result;
        void* out_ptr = nullptr;
        if (out) {
          BufferView target = typed_view(fn, "out", *out, dtype, /*writable=*/true);
          require(target.count == n, fn, "out holds ", target.count, " elements, expected ", n);
          out_ptr = target.data;
          result = *out;
        } else {
          py::array fresh = cached_array(dtype, n);  // reused pages: no fault-and-zero per call
          out_ptr = fresh.mutable_data();
          result = fresh;
        }
        {
          py::gil_scoped_release release;
          dequantize_4bit(static_cast<const uint8_t*>(codes.data), static_cast<const float*>(scales.data), n, type,
                          blocksize, out_ptr, dtype, chosen);
        }
        return result;
      },
      py::arg("packed"), py::arg("absmax"), py::arg("n"), py::arg("quant_type"), py::arg("blocksize"),
      py::arg("dtype"), py::arg("backend"), py::arg("out") = py::none(),
      "Flat 4-bit dequantization into `out` or a new array (bfloat16 as uint16 bits).");

  m.def(
      "double_quantize",
      [](const py::buffer& absmax, int64_t nested_blocksize, std::optional<float> offset, int mean_threads) {
        const char* fn = "double_quantize";
        const BufferView view = typed_view(fn, "absmax", absmax, Format::f32);
        NestedAbsmax nested;
        {
          py::gil_scoped_release release;
          nested = double_quantize(static_cast<const float*>(view.data), view.count, nested_blocksize, offset,
                                   mean_threads);
        }
        py::array_t<uint8_t> codes(nested.codes.size());
        std::copy(nested.codes.begin(), nested.codes.end(), codes.mutable_data());
        return py::make_tuple(codes, float_array(nested.absmax.data(), nested.absmax.size()), nested.offset);
      },
      py::arg("absmax"), py::arg("nested_blocksize") = 256, py::arg("offset") = py::none(),
      py::arg("mean_threads") = 1, "Returns (codes uint8, nested_absmax float32, offset).");

  m.def(
      "double_dequantize",
      [](const py::buffer& codes, const py::buffer& nested_absmax, float offset, int64_t nested_blocksize) {
        const char* fn = "double_dequantize";
        const BufferView code_view = typed_view(fn, "codes", codes, Format::u8);
        const BufferView scale_view = typed_view(fn, "nested_absmax", nested_absmax, Format::f32);
        NestedAbsmax nested;
        const auto* code_ptr = static_cast<const uint8_t*>(code_view.data);
        const auto* scale_ptr = static_cast<const float*>(scale_view.data);
        nested.codes.assign(code_ptr, code_ptr + code_view.count);
        nested.absmax.assign(scale_ptr, scale_ptr + scale_view.count);
        nested.offset = offset;
        nested.blocksize = nested_blocksize;
        py::array_t<float> out(code_view.count);
        double_dequantize(nested, out.mutable_data());
        return out;
      },
      py::arg("codes"), py::arg("nested_absmax"), py::arg("offset"), py::arg("nested_blocksize") = 256);

  m.def("matmul_4bit", &matmul, py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("packed"), py::arg("absmax"),
        py::arg("quant_type"), py::arg("blocksize"), py::arg("out_features"), py::arg("in_features"),
        py::arg("bias") = py::none(), py::arg("transposed") = false, py::arg("backend") = "auto",
        py::arg("out") = py::none(), py::arg("activations") = "exact",
        "y = x W^T (+ bias), or x W when transposed, for a flat 4-bit W [out_features, in_features]; x, bias, out "
        "and the result are flat arrays of `dtype` (bfloat16 as uint16 bits). activations='int8' quantizes x per 32 "
        "elements to int8 (matmul_4bit only).");
  m.def(
      "array_cache_state", [] { return array_cache_state(); },
      "(blocks, bytes) of output memory cached for reuse by new result arrays (HALO_ARRAY_CACHE_MIB).");
  m.def(
      "matmul_4bit_variant",
      [](const std::string& dtype_name, int64_t rows, int64_t out_features, int64_t in_features, int64_t blocksize,
         bool transposed, const std::string& backend, const std::string& activations) {
        const char* fn = "matmul_4bit_variant";
        Quant4Matrix w;
        w.blocksize = blocksize;
        w.out_features = out_features;
        w.in_features = in_features;
        return std::string(matmul_4bit_variant(parse_kernel_float(fn, dtype_name), rows, w, transposed,
                                               parse_backend(backend), parse_activations(fn, activations)));
      },
      py::arg("dtype"), py::arg("rows"), py::arg("out_features"), py::arg("in_features"), py::arg("blocksize"),
      py::arg("transposed") = false, py::arg("backend") = "auto", py::arg("activations") = "exact",
      "Which kernel family such a matmul_4bit call runs here (e.g. 'avx512-amx').");
  m.def(
      "matmul_4bit_pointers",
      [](uintptr_t x, const std::string& dtype_name, int64_t rows, const py::buffer& packed, const py::buffer& absmax,
         const std::string& quant_type, int64_t blocksize, int64_t out_features, int64_t in_features, uintptr_t y,
         bool transposed, const std::string& activations) {
        const char* fn = transposed ? "matmul_4bit_transposed" : "matmul_4bit";
        const Format dtype = parse_kernel_float(fn, dtype_name);
        const Activations mode = parse_activations(fn, activations);
        require(!transposed || mode == Activations::exact, fn, "int8 activations are for matmul_4bit only");
        const Quant4Matrix w = matrix_view(fn, packed, absmax, quant_type, blocksize, out_features, in_features);
        py::gil_scoped_release release;
        if (transposed)
          matmul_4bit_transposed(reinterpret_cast<const void*>(x), dtype, rows, w, reinterpret_cast<void*>(y),
                                 Backend::automatic);
        else
          matmul_4bit(reinterpret_cast<const void*>(x), dtype, rows, w, nullptr, reinterpret_cast<void*>(y),
                      Backend::automatic, mode);
      },
      py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("packed"), py::arg("absmax"), py::arg("quant_type"),
      py::arg("blocksize"), py::arg("out_features"), py::arg("in_features"), py::arg("y"), py::arg("transposed"),
      py::arg("activations") = "exact",
      "The CPU 4-bit matmul on host pointers (data_ptr() of contiguous CPU tensors the caller has checked: "
      "rows x [in or out] values of dtype each), backend auto; the codes and absmax are checked here.");
  m.def(
      "matmul_4bit_device",
      [](uintptr_t x, const std::string& dtype_name, int64_t rows, uintptr_t packed, uintptr_t absmax,
         const std::string& quant_type, int64_t blocksize, int64_t out_features, int64_t in_features, uintptr_t bias,
         uintptr_t y, bool transposed, uintptr_t stream) {
        const char* fn = "matmul_4bit_device";
        const Format dtype = parse_kernel_float(fn, dtype_name);
        Quant4Matrix w;
        w.type = parse_bnb4(fn, quant_type);
        w.blocksize = blocksize;
        w.out_features = out_features;
        w.in_features = in_features;
        w.packed = reinterpret_cast<const uint8_t*>(packed);
        w.absmax = reinterpret_cast<const float*>(absmax);
        py::gil_scoped_release release;
        matmul_4bit_device(reinterpret_cast<const void*>(x), dtype, rows, w, reinterpret_cast<const void*>(bias),
                           reinterpret_cast<void*>(y), transposed, reinterpret_cast<void*>(stream));
      },
      py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("packed"), py::arg("absmax"), py::arg("quant_type"),
      py::arg("blocksize"), py::arg("out_features"), py::arg("in_features"), py::arg("bias"), py::arg("y"),
      py::arg("transposed"), py::arg("stream"),
      "The CUDA 4-bit matmul on device pointers (data_ptr() of CUDA tensors), enqueued on `stream`.");

  m.def("code_book", [](const std::string& quant_type) {
    const Codebook4& f = codebook4(parse_bnb4("code_book", quant_type));
    return float_array(f.code.data(), 16);
  }, py::arg("quant_type"), "The 16 float32 values of a 4-bit format, indexed by code (bitsandbytes' quant_map).");
  m.def("dynamic_map", [] { return float_array(kDynamicMapSigned.data(), 256); },
        "bitsandbytes' signed 8-bit dynamic map (256 float32 values).");
  m.def(
      "torch_mean_f32",
      [](const py::buffer& values, int num_threads) {
        const BufferView view = typed_view("torch_mean_f32", "values", values, Format::f32);
        return torch_mean_f32(static_cast<const float*>(view.data), view.count, num_threads);
      },
      py::arg("values"), py::arg("num_threads") = 1,
      "Mean in PyTorch's CPU summation order for that many threads (bit-exact).");
}

Registrar registrar("quant", bind);

}  // namespace
}  // namespace halo::bindings
