// How an area adds itself to halo._core without editing a shared file:
//   static halo::bindings::Registrar reg("quant", [](pybind11::module_& m) { ... });
// binds into the submodule halo._core.quant. Also the buffer helpers every
// area uses to take NumPy arrays (and torch tensors viewed as NumPy) in.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "halo/core/dtype.hpp"
#include "halo/core/error.hpp"

namespace halo::bindings {

namespace py = pybind11;

using Binder = void (*)(py::module_&);

struct Registrar {
  Registrar(const char* area, Binder binder);
};

// Parses "float32" | "float16" | "bfloat16".
DType parse_dtype(const std::string& function, const std::string& name);

// A C-contiguous buffer's data pointer and element count, checked to hold
// `expected_itemsize`-byte elements.
struct BufferView {
  const void* data;
  int64_t count;
  py::buffer_info info;
};
BufferView contiguous_view(const std::string& function, const std::string& what, const py::buffer& buffer,
                           int64_t expected_itemsize);

// A new 1-D NumPy array for `count` elements of dtype (bfloat16 comes back as uint16 bits).
py::array new_array(DType dtype, int64_t count);

}  // namespace halo::bindings
