// How an area adds itself to halo._core without editing a shared file:
//   static halo::bindings::Registrar reg("quant", [](pybind11::module_& m) { ... });
// binds into the submodule halo._core.quant. Also the typed buffer checks every
// area uses to take NumPy arrays (and torch tensors viewed as NumPy) in: a buffer
// is accepted only when its format character is one the format table lists for
// the expected format, in native (little-endian) byte order, and C-contiguous.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "halo/core/error.hpp"
#include "halo/core/format.hpp"

namespace halo::bindings {

namespace py = pybind11;

using Binder = void (*)(py::module_&);

struct Registrar {
  Registrar(const char* area, Binder binder);
};

struct BufferView {
  void* data;
  int64_t count;
  py::buffer_info info;
};

// A C-contiguous buffer holding `expected` elements (bfloat16 as its uint16/int16 bits).
// TypeMismatch names the function, the argument and what was given otherwise.
BufferView typed_view(const std::string& function, const std::string& what, const py::buffer& buffer,
                      Format expected, bool writable = false);

// A C-contiguous buffer of any element type in native byte order (raw bytes are wanted).
BufferView byte_view(const std::string& function, const std::string& what, const py::buffer& buffer);

// A new 1-D NumPy array for `count` elements of an element format (bfloat16 comes back as uint16 bits).
py::array new_array(Format format, int64_t count);

}  // namespace halo::bindings
