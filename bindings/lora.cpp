// halo._core.lora: LoRA forward/backward kernels, dropout masks and merge.
// Activations and adapters come in as C-contiguous float32 or float64 NumPy
// arrays (all of one type); the base weight as a flat buffer described by
// base_dtype ("float32", "float16", "bfloat16" (uint16 bits), "float64") or,
// for a 4-bit base ("nf4" / "fp4"), packed codes plus float32 absmax.
#include <cmath>
#include <optional>

#include "bindings/registry.hpp"
#include "halo/lora/linear.hpp"
#include "halo/lora/merge.hpp"
#include "halo/quant/quant4.hpp"

namespace halo::bindings {
namespace {

using lora::BaseWeight;

int64_t element_count(const py::array& array) {
  int64_t count = 1;
  for (py::ssize_t i = 0; i < array.ndim(); ++i) count *= array.shape(i);
  return count;
}

// The array's data as Scalar, checked for type, contiguity and element count.
template <typename Scalar>
const Scalar* scalar_data(const char* fn, const char* what, const py::array& array, int64_t expected) {
  const char* type_name = std::is_same_v<Scalar, float> ? "float32" : "float64";
  require<TypeMismatch>(array.dtype().kind() == 'f' && array.itemsize() == sizeof(Scalar), fn, what, " must be ",
                        type_name, " like x, got ", std::string(py::str(array.dtype())));
  require<TypeMismatch>(array.dtype().byteorder() != '>', fn, what, " is big-endian; convert it to native byte order");
  require(array.flags() & py::array::c_style, fn, what, " must be C-contiguous");
  require(element_count(array) == expected, fn, what, " holds ", element_count(array), " elements, expected ",
          expected);
  return static_cast<const Scalar*>(array.data());
}

BaseWeight make_base(const char* fn, const py::buffer& weight, const std::string& base_dtype, int64_t out_features,
                     int64_t in_features, bool fan_in_fan_out, const std::optional<py::buffer>& absmax,
                     int64_t blocksize, const std::string& backend) {
  require(out_features > 0 && in_features > 0, fn, "base shape must be positive, got [", out_features, ", ",
          in_features, "]");
  BaseWeight base;
  base.out_features = out_features;
  base.in_features = in_features;
  base.fan_in_fan_out = fan_in_fan_out;
  base.backend = parse_backend(backend);
  const int64_t n = out_features * in_features;
  const auto format = format_from_name(base_dtype);
  if (format && is_bnb4(*format)) {
    check_bnb4(fn, *format, blocksize);
    base.storage = *format;
    base.blocksize = blocksize;
    const BufferView codes = typed_view(fn, "packed", weight, Format::u8);
    require(codes.count == packed_size(n), fn, "packed holds ", codes.count, " bytes, expected ", packed_size(n));
    require(absmax.has_value(), fn, "a 4-bit base needs absmax");
    const BufferView scales = typed_view(fn, "absmax", *absmax, Format::f32);
    require(scales.count == num_blocks(n, blocksize), fn, "absmax holds ", scales.count, " values, expected ",
            num_blocks(n, blocksize));
    base.packed = static_cast<const uint8_t*>(codes.data);
    base.absmax = static_cast<const float*>(scales.data);
    return base;
  }
  require<TypeMismatch>(format && (is_kernel_float(*format) || *format == Format::f64), fn,
                        "base dtype must be float32, float16, bfloat16, float64, nf4 or fp4, got '", base_dtype, "'");
  base.storage = *format;
  const BufferView view = typed_view(fn, "base", weight, *format);
  require(view.count == n, fn, "base holds ", view.count, " elements, expected ", n);
  base.data = view.data;
  return base;
}

template <typename Scalar>
py::array forward_impl(const py::array& x, const py::array& lora_a, const py::array& lora_b,
                       const std::optional<py::array>& bias, const BaseWeight& base, const lora::LoraSpec& spec) {
  const char* fn = "lora_forward";
  const int64_t in = base.in_features, out = base.out_features;
  require(x.ndim() == 2 && x.shape(1) == in, fn, "x must be [rows, ", in, "]");
  const int64_t rows = x.shape(0);
  const Scalar* x_ptr = scalar_data<Scalar>(fn, "x", x, rows * in);
  const Scalar* a_ptr = scalar_data<Scalar>(fn, "lora_A", lora_a, spec.rank * in);
  const Scalar* b_ptr = scalar_data<Scalar>(fn, "lora_B", lora_b, out * spec.rank);
  const Scalar* bias_ptr = bias ? scalar_data<Scalar>(fn, "bias", *bias, out) : nullptr;
  py::array_t<Scalar> y({rows, out});
  Scalar* y_ptr = y.mutable_data();
  {
    py::gil_scoped_release release;
    lora::lora_forward<Scalar>(x_ptr, rows, base, a_ptr, b_ptr, bias_ptr, spec, y_ptr);
  }
  return y;
}

template <typename Scalar>
py::tuple backward_impl(const py::array& grad_y, const py::array& x, const py::array& lora_a,
                        const py::array& lora_b, bool with_bias, const BaseWeight& base, const lora::LoraSpec& spec) {
  const char* fn = "lora_backward";
  const int64_t in = base.in_features, out = base.out_features;
  require(x.ndim() == 2 && x.shape(1) == in, fn, "x must be [rows, ", in, "]");
  const int64_t rows = x.shape(0);
  const Scalar* dy_ptr = scalar_data<Scalar>(fn, "grad_y", grad_y, rows * out);
  const Scalar* x_ptr = scalar_data<Scalar>(fn, "x", x, rows * in);
  const Scalar* a_ptr = scalar_data<Scalar>(fn, "lora_A", lora_a, spec.rank * in);
  const Scalar* b_ptr = scalar_data<Scalar>(fn, "lora_B", lora_b, out * spec.rank);
  py::array_t<Scalar> dx({rows, in}), da({spec.rank, in}), db({out, spec.rank}), dbias(with_bias ? out : 0);
  Scalar *dx_ptr = dx.mutable_data(), *da_ptr = da.mutable_data(), *db_ptr = db.mutable_data();
  Scalar* dbias_ptr = with_bias ? dbias.mutable_data() : nullptr;
  {
    py::gil_scoped_release release;
    lora::lora_backward<Scalar>(dy_ptr, x_ptr, rows, base, a_ptr, b_ptr, spec, dx_ptr, da_ptr, db_ptr, dbias_ptr);
  }
  return py::make_tuple(dx, da, db, with_bias ? py::object(dbias) : py::object(py::none()));
}

bool is_float64(const char* fn, const py::array& x) {
  require<TypeMismatch>(x.dtype().kind() == 'f' && (x.itemsize() == 4 || x.itemsize() == 8), fn,
                        "x must be float32 or float64, got ", std::string(py::str(x.dtype())));
  return x.itemsize() == 8;
}

lora::LoraSpec make_spec(const char* fn, const py::array& lora_a, double scaling, double dropout, uint64_t seed) {
  require(lora_a.ndim() == 2, fn, "lora_A must be 2-D [r, in], got ", lora_a.ndim(), " dimensions");
  return lora::LoraSpec{static_cast<int64_t>(lora_a.shape(0)), scaling, dropout, seed};
}

void bind(py::module_& m) {
  m.def(
      "forward",
      [](const py::array& x, const py::array& lora_a, const py::array& lora_b, const std::optional<py::array>& bias,
         const py::buffer& base, const std::string& base_dtype, int64_t out_features, int64_t in_features,
         bool fan_in_fan_out, double scaling, double dropout, uint64_t seed, const std::optional<py::buffer>& absmax,
         int64_t blocksize, const std::string& backend) {
        const char* fn = "lora_forward";
        const BaseWeight w =
            make_base(fn, base, base_dtype, out_features, in_features, fan_in_fan_out, absmax, blocksize, backend);
        const lora::LoraSpec spec = make_spec(fn, lora_a, scaling, dropout, seed);
        return is_float64(fn, x) ? forward_impl<double>(x, lora_a, lora_b, bias, w, spec)
                                 : forward_impl<float>(x, lora_a, lora_b, bias, w, spec);
      },
      py::arg("x"), py::arg("lora_a"), py::arg("lora_b"), py::arg("bias"), py::arg("base"), py::arg("base_dtype"),
      py::arg("out_features"), py::arg("in_features"), py::arg("fan_in_fan_out"), py::arg("scaling"),
      py::arg("dropout"), py::arg("seed"), py::arg("absmax") = py::none(), py::arg("blocksize") = 64,
      py::arg("backend") = "auto", "y = x W^T (+ bias) + scaling * (drop(x) A^T) B^T; x is [rows, in].");

  m.def(
      "backward",
      [](const py::array& grad_y, const py::array& x, const py::array& lora_a, const py::array& lora_b,
         bool with_bias, const py::buffer& base, const std::string& base_dtype, int64_t out_features,
         int64_t in_features, bool fan_in_fan_out, double scaling, double dropout, uint64_t seed,
         const std::optional<py::buffer>& absmax, int64_t blocksize, const std::string& backend) {
        const char* fn = "lora_backward";
        const BaseWeight w =
            make_base(fn, base, base_dtype, out_features, in_features, fan_in_fan_out, absmax, blocksize, backend);
        const lora::LoraSpec spec = make_spec(fn, lora_a, scaling, dropout, seed);
        return is_float64(fn, x) ? backward_impl<double>(grad_y, x, lora_a, lora_b, with_bias, w, spec)
                                 : backward_impl<float>(grad_y, x, lora_a, lora_b, with_bias, w, spec);
      },
      py::arg("grad_y"), py::arg("x"), py::arg("lora_a"), py::arg("lora_b"), py::arg("with_bias"), py::arg("base"),
      py::arg("base_dtype"), py::arg("out_features"), py::arg("in_features"), py::arg("fan_in_fan_out"),
      py::arg("scaling"), py::arg("dropout"), py::arg("seed"), py::arg("absmax") = py::none(),
      py::arg("blocksize") = 64, py::arg("backend") = "auto",
      "Returns (grad_x, grad_A, grad_B, grad_bias or None); the dropout mask is recomputed from the seed.");

  m.def(
      "dropout_mask",
      [](uint64_t seed, int64_t count, double p) {
        require(count >= 0, "dropout_mask", "count must be non-negative, got ", count);
        py::array_t<float> mask(count);
        float* data = mask.mutable_data();
        {
          py::gil_scoped_release release;
          lora::dropout_mask(seed, count, p, data);
        }
        return mask;
      },
      py::arg("seed"), py::arg("count"), py::arg("p"),
      "The LoRA dropout mask (0 or 1/(1-p)) for the first `count` flat elements of x.");

  m.def(
      "merge",
      [](const py::buffer& weight, const std::string& dtype_name, int64_t out_features, int64_t in_features,
         const py::array& lora_a, const py::array& lora_b, double scaling, bool fan_in_fan_out, bool subtract) {
        const char* fn = subtract ? "unmerge" : "merge";
        const Format dtype = parse_kernel_float(fn, dtype_name);
        const BufferView view = typed_view(fn, "W", weight, dtype);
        require(out_features > 0 && in_features > 0, fn, "weight shape must be positive");
        require(view.count == out_features * in_features, fn, "W holds ", view.count, " elements, expected ",
                out_features * in_features);
        require(lora_a.ndim() == 2 && lora_a.shape(1) == in_features, fn, "lora_A must be [r, ", in_features, "]");
        const int64_t rank = lora_a.shape(0);
        const float* a_ptr = scalar_data<float>(fn, "lora_A", lora_a, rank * in_features);
        const float* b_ptr = scalar_data<float>(fn, "lora_B", lora_b, out_features * rank);
        const float scale = static_cast<float>(scaling);
        require(std::isfinite(scale), fn, "scaling ", scaling, " is not finite in float32");
        py::array out = new_array(dtype, view.count);
        void* out_ptr = out.mutable_data();
        {
          py::gil_scoped_release release;
          lora::merge_weight(view.data, dtype, out_ptr, out_features, in_features, a_ptr, b_ptr, rank, scale,
                             fan_in_fan_out, subtract);
        }
        return out;
      },
      py::arg("weight"), py::arg("dtype"), py::arg("out_features"), py::arg("in_features"), py::arg("lora_a"),
      py::arg("lora_b"), py::arg("scaling"), py::arg("fan_in_fan_out"), py::arg("subtract"),
      "W +/- scaling * B @ A (transposed with fan_in_fan_out) as a new flat array of W's dtype.");
}

Registrar registrar("lora", bind);

}  // namespace
}  // namespace halo::bindings
