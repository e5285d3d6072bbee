#include <optional>

#include "bindings/array_cache.hpp"
#include "bindings/registry.hpp"
#include "halo/core/reduce.hpp"
#include "halo/quant/codebook4.hpp"
#include "halo/quant/matmul4.hpp"
#include "halo/quant/quant4.hpp"

namespace halo::bindings {
namespace {

// ---- matmul_4bit: argument translation only (behaviour in src/quant/matmul4.cpp) ----

Quant4Matrix matrix_view(const char* fn, const py::buffer& packed, const py::buffer& absmax,
                         const std::string& quant_type, int64_t blocksize, int64_t out_features, int64_t in_features) {
  Quant4Matrix w;
  w.type = parse_bnb4(fn, quant_type);
  check_bnb4(fn, w.type, blocksize);
  require(out_features > 0 && in_features > 0, fn, "weight shape must be positive, got [", out_features, ", ",
          in_features, "]");
  require(out_features <= (int64_t(1) << 40) / in_features, fn, "weight shape [", out_features, ", ", in_features,
          "] is too large");
  const int64_t n = out_features * in_features;
  const BufferView codes = typed_view(fn, "packed", packed, Format::u8);
  const BufferView scales = typed_view(fn, "absmax", absmax, Format::f32);
  require(codes.count == packed_size(n), fn, "packed holds ", codes.count, " bytes, expected ", packed_size(n),
          " for a [", out_features, ", ", in_features, "] weight");
  require(scales.count == num_blocks(n, blocksize), fn, "absmax holds ", scales.count, " values, expected ",
          num_blocks(n, blocksize));
  w.packed = static_cast<const uint8_t*>(codes.data);
  w.absmax = static_cast<const float*>(scales.data);
  w.blocksize = blocksize;
  w.out_features = out_features;
  w.in_features = in_features;
  return w;
}

py::object matmul(const py::buffer& x, const std::string& dtype_name, int64_t rows, const py::buffer& packed,
                  const py::buffer& absmax, const std::string& quant_type, int64_t blocksize, int64_t out_features,
                  int64_t in_features, const std::optional<py::buffer>& bias, bool transposed,
                  const std::string& backend, const std::optional<py::buffer>& out) {
  const char* fn = transposed ? "matmul_4bit_transposed" : "matmul_4bit";
  const Format dtype = parse_kernel_float(fn, dtype_name);
  const Backend chosen = parse_backend(backend);
  const Quant4Matrix w = matrix_view(fn, packed, absmax, quant_type, blocksize, out_features, in_features);
  require(rows >= 0, fn, "rows must be non-negative, got ", rows);
  const int64_t x_cols = transposed ? out_features : in_features;
  const int64_t y_cols = transposed ? in_features : out_features;
  const BufferView input = typed_view(fn, "x", x, dtype);
  require(input.count == rows * x_cols, fn, "x holds ", input.count, " elements, expected ", rows, " x ", x_cols);
  const void* bias_ptr = nullptr;
  if (bias) {
    require(!transposed, fn, "bias is not supported by the transposed product");
    const BufferView bias_view = typed_view(fn, "bias", *bias, dtype);
    require(bias_view.count == y_cols, fn, "bias holds ", bias_view.count, " elements, expected ", y_cols);
    bias_ptr = bias_view.data;
  }
  py::object result;
  void* y_ptr = nullptr;
  if (out) {
    const BufferView target = typed_view(fn, "out", *out, dtype, /*writable=*/true);
    require(target.count == rows * y_cols, fn, "out holds ", target.count, " elements, expected ", rows, " x ",
            y_cols);
    y_ptr = target.data;
    result = *out;
  } else {
    py::array fresh = cached_array(dtype, rows * y_cols);
    y_ptr = fresh.mutable_data();
    result = fresh;
  }
  {
    py::gil_scoped_release release;
    if (transposed)
      matmul_4bit_transposed(input.data, dtype, rows, w, y_ptr, chosen);
    else
      matmul_4bit(input.data, dtype, rows, w, bias_ptr, y_ptr, chosen);
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
        require(view.count > 0, fn, "the tensor is empty");
        check_bnb4(fn, type, blocksize);
        py::array_t<uint8_t> packed(packed_size(view.count));
        py::array_t<float> absmax(num_blocks(view.count, blocksize));
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
        require(n > 0, fn, "element count must be positive, got ", n);
        check_bnb4(fn, type, blocksize);
        require(codes.count == packed_size(n), fn, "packed holds ", codes.count, " bytes, expected ",
                packed_size(n), " for ", n, " elements");
        require(scales.count == num_blocks(n, blocksize), fn, "absmax holds ", scales.count, " values, expected ",
                num_blocks(n, blocksize), " for ", n, " elements in blocks of ", blocksize);
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
        require(mean_threads >= 1, fn, "mean_threads must be >= 1, got ", mean_threads);
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
        require(nested_blocksize > 0, fn, "nested_blocksize must be positive, got ", nested_blocksize);
        require(scale_view.count == num_blocks(code_view.count, nested_blocksize), fn, "nested_absmax holds ",
                scale_view.count, " values, expected ", num_blocks(code_view.count, nested_blocksize));
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
        py::arg("out") = py::none(),
        "y = x W^T (+ bias), or x W when transposed, for a flat 4-bit W [out_features, in_features]; x, bias, out "
        "and the result are flat arrays of `dtype` (bfloat16 as uint16 bits).");
  m.def(
      "array_cache_state", [] { return array_cache_state(); },
      "(blocks, bytes) of output memory cached for reuse by new result arrays (HALO_ARRAY_CACHE_MIB).");
  m.def(
      "matmul_4bit_variant",
      [](const std::string& dtype_name, int64_t rows, int64_t out_features, int64_t in_features, int64_t blocksize,
         bool transposed, const std::string& backend) {
        const char* fn = "matmul_4bit_variant";
        Quant4Matrix w;
        w.blocksize = blocksize;
        w.out_features = out_features;
        w.in_features = in_features;
        return std::string(
            matmul_4bit_variant(parse_kernel_float(fn, dtype_name), rows, w, transposed, parse_backend(backend)));
      },
      py::arg("dtype"), py::arg("rows"), py::arg("out_features"), py::arg("in_features"), py::arg("blocksize"),
      py::arg("transposed") = false, py::arg("backend") = "auto",
      "Which kernel family such a matmul_4bit call runs here (e.g. 'avx512-amx').");
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
