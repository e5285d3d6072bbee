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

namespace {

// The format character without a byte-order prefix; '>' and '!' (big-endian) are
// refused because every kernel reads native little-endian data.
std::string bare_format(const std::string& function, const std::string& what, const std::string& format) {
  if (!format.empty() && (format[0] == '>' || format[0] == '!'))
    fail<TypeMismatch>(function, what, " is big-endian (buffer format '", format,
                       "'); convert it to native byte order first (e.g. array.astype(array.dtype.newbyteorder('=')))");
  if (!format.empty() && (format[0] == '<' || format[0] == '=' || format[0] == '@')) return format.substr(1);
  return format;
}

void check_contiguous(const std::string& function, const std::string& what, const py::buffer_info& info) {
  int64_t stride = info.itemsize;
  for (int64_t d = info.ndim - 1; d >= 0; --d) {
    require(info.shape[d] == 1 || info.strides[d] == stride, function, what, " must be C-contiguous");
    stride *= info.shape[d];
  }
}

}  // namespace

BufferView typed_view(const std::string& function, const std::string& what, const py::buffer& buffer,
                      Format expected, bool writable) {
  py::buffer_info info = buffer.request(writable);
  const FormatTraits& t = traits(expected);
  const std::string format = bare_format(function, what, info.format);
  const bool known = format.size() == 1 && t.buffer.find(format[0]) != std::string_view::npos;
  require<TypeMismatch>(known && info.itemsize == t.block_bytes && t.block_elems == 1, function, what,
                        " must hold ", t.name, " elements, got buffer format '", info.format, "' with ",
                        info.itemsize, "-byte items");
  if (writable) require(!info.readonly, function, what, " is read-only");
  check_contiguous(function, what, info);
  return BufferView{info.ptr, int64_t(info.size), std::move(info)};
}

BufferView byte_view(const std::string& function, const std::string& what, const py::buffer& buffer) {
  py::buffer_info info = buffer.request();
  bare_format(function, what, info.format);
  check_contiguous(function, what, info);
  return BufferView{info.ptr, int64_t(info.size), std::move(info)};
}

py::array new_array(Format format, int64_t count) {
  const FormatTraits& t = traits(format);
  require(t.block_elems == 1, "new_array", "format ", t.name, " is not an element format");
  const std::string numpy = format == Format::bf16 ? "uint16" : t.kind == FormatKind::floating && t.block_bytes == 1
                                                                   ? "uint8"
                                                                   : std::string(t.numpy);
  return py::array(py::dtype(numpy), std::vector<py::ssize_t>{py::ssize_t(count)});
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
    } catch (const halo::InvalidArgument& e) {
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
