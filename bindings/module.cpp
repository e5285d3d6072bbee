#include <map>
#include <string>

#include "bindings/registry.hpp"
#include "halo/backend/backend.hpp"

namespace halo::bindings {
namespace {
std::map<std::string, Binder>& registry() {
  static std::map<std::string, Binder> areas;
  return areas;
}
}  // namespace

Registrar::Registrar(const char* area, Binder binder) { registry()[area] = binder; }

DType parse_dtype(const std::string& function, const std::string& name) {
  if (name == "float32") return DType::f32;
  if (name == "float16") return DType::f16;
  if (name == "bfloat16") return DType::bf16;
  fail<TypeMismatch>(function, "unsupported dtype '", name, "'; expected float32, float16 or bfloat16");
}

BufferView contiguous_view(const std::string& function, const std::string& what, const py::buffer& buffer,
                           int64_t expected_itemsize) {
  py::buffer_info info = buffer.request();
  require<TypeMismatch>(info.itemsize == expected_itemsize, function, what, " must have ", expected_itemsize,
                        "-byte elements, got ", info.itemsize, "-byte elements (format '", info.format, "')");
  int64_t stride = info.itemsize;
  for (int64_t d = info.ndim - 1; d >= 0; --d) {
    require(info.shape[d] == 1 || info.strides[d] == stride, function, what, " must be C-contiguous");
    stride *= info.shape[d];
  }
  return BufferView{info.ptr, info.size, std::move(info)};
}

py::array new_array(DType dtype, int64_t count) {
  switch (dtype) {
    case DType::f32: return py::array_t<float>(count);
    case DType::f16: return py::array(py::dtype("float16"), std::vector<py::ssize_t>{py::ssize_t(count)});
    case DType::bf16: return py::array_t<uint16_t>(count);
  }
  return {};
}

}  // namespace halo::bindings

PYBIND11_MODULE(_core, m) {
  namespace py = pybind11;
  m.doc() = "halo's compiled core; use the `halo` package instead of importing this directly.";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const halo::TypeMismatch& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const halo::FormatError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const halo::BackendUnavailable& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });
  for (auto& [area, binder] : halo::bindings::registry()) {
    py::module_ sub = m.def_submodule(area.c_str());
    binder(sub);
  }
}
