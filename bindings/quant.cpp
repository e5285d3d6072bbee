#include <optional>

#include "bindings/registry.hpp"
#include "halo/core/reduce.hpp"
#include "halo/quant/codebook4.hpp"
#include "halo/quant/quant4.hpp"

namespace halo::bindings {
namespace {

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
          py::array fresh = new_array(dtype, n);
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
