// halo._core.gguf: the GGUF reader (metadata as Python values, tensor bytes as
// zero-copy NumPy views), the streaming writer and the row conversions.
#include <memory>

#include "bindings/registry.hpp"
#include "halo/backend/backend.hpp"
#include "halo/gguf/convert.hpp"
#include "halo/gguf/gguf.hpp"

namespace halo::bindings {
namespace {

using halo::gguf::GgmlType;
using halo::gguf::GgufFile;
using halo::gguf::GgufWriter;
using halo::gguf::KeyValue;
using halo::gguf::Value;
using halo::gguf::ValueType;

// GGUF strings are bytes; invalid UTF-8 survives as surrogate escapes (and goes
// back unchanged through the writer).
py::object to_str(const std::string& s) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), py::ssize_t(s.size()), "surrogateescape");
  if (o == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(o);
}

std::string from_str(const py::handle& h, const std::string& what) {
  if (!py::isinstance<py::str>(h)) fail<TypeMismatch>("GgufWriter", what, " must be a str");
  PyObject* b = PyUnicode_AsEncodedString(h.ptr(), "utf-8", "surrogateescape");
  if (b == nullptr) throw py::error_already_set();
  auto bytes = py::reinterpret_steal<py::bytes>(b);
  return std::string(bytes);
}

py::dtype numpy_dtype(ValueType t) {
  switch (t) {
    case ValueType::u8: return py::dtype("uint8");
    case ValueType::i8: return py::dtype("int8");
    case ValueType::u16: return py::dtype("uint16");
    case ValueType::i16: return py::dtype("int16");
    case ValueType::u32: return py::dtype("uint32");
    case ValueType::i32: return py::dtype("int32");
    case ValueType::f32: return py::dtype("float32");
    case ValueType::boolean: return py::dtype("bool");
    case ValueType::u64: return py::dtype("uint64");
    case ValueType::i64: return py::dtype("int64");
    case ValueType::f64: return py::dtype("float64");
    default: fail("gguf", "no NumPy dtype for ", halo::gguf::value_type_name(t));
  }
}

ValueType parse_value_type(const std::string& name) {
  for (uint32_t t = 0; t <= uint32_t(ValueType::f64); ++t)
    if (halo::gguf::value_type_name(ValueType(t)) == name) return ValueType(t);
  fail("GgufWriter", "unknown GGUF value type '", name, "'");
}

py::object scalar_to_python(const Value& v) {
  switch (v.type) {
    case ValueType::string: return to_str(v.strings[0]);
    case ValueType::boolean: return py::bool_(v.bytes[0] != 0);
    case ValueType::f32:
    case ValueType::f64: return py::float_(v.as_f64());
    case ValueType::i8:
    case ValueType::i16:
    case ValueType::i32:
    case ValueType::i64: return py::int_(v.as_i64());
    default: return py::int_(v.as_u64());
  }
}

// (type name, value): arrays as "array[elem]" with a NumPy array or a list of str.
py::tuple value_to_python(const Value& v) {
  if (!v.is_array()) return py::make_tuple(std::string(halo::gguf::value_type_name(v.type)), scalar_to_python(v));
  const std::string type = "array[" + std::string(halo::gguf::value_type_name(v.element_type)) + "]";
  if (v.element_type == ValueType::string) {
    py::list items;
    for (const std::string& s : v.strings) items.append(to_str(s));
    return py::make_tuple(type, items);
  }
  py::array out(numpy_dtype(v.element_type), std::vector<py::ssize_t>{py::ssize_t(v.count)});
  if (!v.bytes.empty()) std::memcpy(out.mutable_data(), v.bytes.data(), v.bytes.size());
  return py::make_tuple(type, out);
}

Value value_from_python(const std::string& key, const std::string& type, const py::handle& value) {
  const std::string what = "value of '" + key + "'";
  if (type.rfind("array[", 0) == 0 && type.back() == ']') {
    const ValueType element = parse_value_type(type.substr(6, type.size() - 7));
    if (element == ValueType::string) {
      std::vector<std::string> items;
      for (const py::handle& item : value) items.push_back(from_str(item, what + " item"));
      return Value::string_array(std::move(items));
    }
    require(element != ValueType::array, "GgufWriter", "key '", key, "': arrays of arrays are not supported");
    py::array arr = py::array::ensure(value, py::array::c_style | py::array::forcecast);
    if (!arr) fail<TypeMismatch>("GgufWriter", what, " must be array-like");
    const py::dtype want = numpy_dtype(element);
    if (!arr.dtype().is(want)) arr = arr.attr("astype")(want);
    return Value::numeric_array(element, arr.data(), uint64_t(arr.size()));
  }
  const ValueType t = parse_value_type(type);
  if (t == ValueType::string) return Value::string(from_str(value, what));
  require(t != ValueType::array, "GgufWriter", "key '", key, "': give arrays as 'array[<element type>]'");
  if (t == ValueType::boolean) {
    if (!py::isinstance<py::bool_>(value)) fail<TypeMismatch>("GgufWriter", what, " must be a bool");
    return Value::boolean(value.cast<bool>());
  }
  if (t == ValueType::f32 || t == ValueType::f64) {
    const double d = value.cast<double>();
    if (t == ValueType::f32) return Value::f32(float(d));
    return Value::number(t, &d);
  }
  if (!py::isinstance<py::int_>(value) || py::isinstance<py::bool_>(value))
    fail<TypeMismatch>("GgufWriter", what, " must be an int for type ", type);
  // Range-checked through NumPy's cast rules would be lenient; check explicitly.
  const auto wide = value.cast<py::int_>();
  const bool is_signed = t == ValueType::i8 || t == ValueType::i16 || t == ValueType::i32 || t == ValueType::i64;
  const int bits = int(halo::gguf::value_type_size(t)) * 8;
  if (is_signed) {
    const auto v = wide.cast<int64_t>();
    require(bits == 64 || (v >= -(int64_t(1) << (bits - 1)) && v < (int64_t(1) << (bits - 1))), "GgufWriter", what,
            " = ", v, " does not fit in ", type);
    return Value::number(t, &v);  // little-endian: the low bytes are the narrow value
  }
  if (wide.cast<py::object>().attr("__lt__")(0).cast<bool>())
    fail("GgufWriter", what, " is negative, type ", type, " is unsigned");
  const auto v = wide.cast<uint64_t>();
  require(bits == 64 || v < (uint64_t(1) << bits), "GgufWriter", what, " = ", v, " does not fit in ", type);
  return Value::number(t, &v);
}

py::array tensor_view(const std::shared_ptr<GgufFile>& file, const std::string& name) {
  const auto& info = file->tensor(name);
  auto* keep = new std::shared_ptr<GgufFile>(file);
  py::capsule owner(keep, [](void* p) { delete static_cast<std::shared_ptr<GgufFile>*>(p); });
  py::array out(py::dtype("uint8"), std::vector<py::ssize_t>{py::ssize_t(info.nbytes)}, file->data(info), owner);
  out.attr("setflags")(py::arg("write") = false);
  return out;
}

GgmlType convertible_type(const std::string& fn, const std::string& name) {
  const GgmlType t = halo::gguf::parse_type(name);
  require(halo::gguf::convertible(t), fn, "type ", name, " cannot be converted by halo");
  return t;
}

py::array quantize(const py::buffer& data, const std::string& type, const std::string& backend) {
  const char* fn = "gguf.quantize";
  const GgmlType t = convertible_type(fn, type);
  const BufferView v = typed_view(fn, "data", data, Format::f32);
  const Backend b = parse_backend(backend);
  py::array_t<uint8_t> out(py::ssize_t(halo::gguf::type_bytes(t, v.count)));
  auto* dst = out.mutable_data();
  const auto* src = static_cast<const float*>(v.data);
  {
    py::gil_scoped_release release;
    halo::gguf::quantize_rows(t, src, dst, v.count, b);
  }
  return out;
}

py::array dequantize(const py::buffer& data, const std::string& type, int64_t n, const std::string& backend) {
  const char* fn = "gguf.dequantize";
  const GgmlType t = convertible_type(fn, type);
  const BufferView v = byte_view(fn, "data", data);
  const uint64_t have = uint64_t(v.count) * uint64_t(v.info.itemsize);
  require(n >= 0, fn, "n must be >= 0, got ", n);
  const uint64_t need = halo::gguf::type_bytes(t, n);
  require(have == need, fn, n, " values of ", type, " need ", need, " bytes, got ", have);
  const Backend b = parse_backend(backend);
  py::array_t<float> out(n);
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    halo::gguf::dequantize_rows(t, v.data, dst, n, b);
  }
  return out;
}

void bind(py::module_& m) {
  m.def("quantize", &quantize, py::arg("data"), py::arg("type"), py::arg("backend") = "auto",
        "Flat float32 data (a multiple of the block size) -> uint8 blocks of a GGUF type, ggml's reference bytes.");
  m.def("dequantize", &dequantize, py::arg("data"), py::arg("type"), py::arg("n"), py::arg("backend") = "auto",
        "n values of a GGUF type (its bytes) -> float32.");
  m.def(
      "type_info",
      [](const std::string& name) {
        const GgmlType t = halo::gguf::parse_type(name);
        const auto layout = *halo::gguf::type_layout(uint32_t(t));
        return py::make_tuple(uint32_t(t), std::string(layout.name), layout.block, layout.bytes,
                              halo::gguf::convertible(t));
      },
      py::arg("name"), "(id, name, block size, bytes per block, convertible) of a GGUF tensor type.");
  m.def(
      "type_info_by_id",
      [](uint32_t id) -> py::object {
        const auto layout = halo::gguf::type_layout(id);
        if (!layout) return py::none();
        return py::make_tuple(id, std::string(layout->name), layout->block, layout->bytes,
                              halo::gguf::convertible(layout->type));
      },
      py::arg("id"), "Like type_info, by ggml type id; None when unknown.");

  py::class_<GgufFile, std::shared_ptr<GgufFile>>(m, "GgufFile", "A memory-mapped, validated GGUF file.")
      .def_property_readonly("path", &GgufFile::path)
      .def_property_readonly("version", &GgufFile::version)
      .def_property_readonly("alignment", &GgufFile::alignment)
      .def_property_readonly("data_offset", &GgufFile::data_offset)
      .def_property_readonly("file_size", &GgufFile::file_size)
      .def("metadata", [](const GgufFile& f) {
        py::list out;
        for (const KeyValue& kv : f.metadata()) {
          py::tuple tv = value_to_python(kv.value);
          out.append(py::make_tuple(to_str(kv.key), tv[0], tv[1]));
        }
        return out;
      }, "[(key, type, value)] in file order; arrays have type 'array[elem]' and a NumPy array or list of str.")
      .def("tensors", [](const GgufFile& f) {
        py::list out;
        for (const auto& t : f.tensors())
          out.append(py::make_tuple(to_str(t.name), t.dims, std::string(halo::gguf::type_name(t.type)), t.offset, t.nbytes));
        return out;
      }, "[(name, dims (ne order), type, offset, nbytes)] in file order.")
      .def("tensor_data", &tensor_view, py::arg("name"), "A read-only zero-copy uint8 view of a tensor's bytes.")
      .def("to_float", [](const GgufFile& f, const std::string& name, const std::string& backend) {
        const auto& info = f.tensor(name);
        require(halo::gguf::convertible(info.type), "GgufFile.to_float", f.path(), ": tensor '", name, "' has type ",
                halo::gguf::type_name(info.type), ", which halo cannot dequantize");
        py::array_t<float> out(info.numel());
        float* dst = out.mutable_data();
        const Backend b = parse_backend(backend);
        {
          py::gil_scoped_release release;
          f.to_float(info, dst, b);
        }
        return out;
      }, py::arg("name"), py::arg("backend") = "auto", "A tensor dequantized to flat float32.")
      .def("release_pages", &GgufFile::release_pages, "Drops the mapping's resident pages from this process.");

  m.def(
      "open_gguf",
      [](const std::string& path) {
        py::gil_scoped_release release;
        return GgufFile::open(path);
      },
      py::arg("path"), "Maps and validates a GGUF file (ValueError naming the file and the problem).");

  py::class_<GgufWriter>(m, "GgufWriter", "Streams tensors into a GGUF v3 file (temp file, then rename).")
      .def(py::init([](const std::string& path, const py::list& metadata,
                       const std::vector<std::tuple<std::string, std::vector<int64_t>, std::string>>& tensors,
                       uint32_t alignment) {
             std::vector<KeyValue> kvs;
             for (const py::handle& item : metadata) {
               auto t = item.cast<py::tuple>();
               require(t.size() == 3, "GgufWriter", "metadata items are (key, type, value)");
               const std::string key = from_str(t[0], "metadata key");
               kvs.push_back({key, value_from_python(key, t[1].cast<std::string>(), t[2])});
             }
             std::vector<halo::gguf::TensorSpec> specs;
             for (const auto& [name, dims, type] : tensors) specs.push_back({name, dims, halo::gguf::parse_type(type)});
             py::gil_scoped_release release;
             return std::make_unique<GgufWriter>(path, std::move(kvs), std::move(specs), alignment);
           }),
           py::arg("path"), py::arg("metadata"), py::arg("tensors"), py::arg("alignment") = 32)
      .def("write", [](GgufWriter& w, const std::string& name, const py::buffer& data) {
        const BufferView view = byte_view("GgufWriter.write", name, data);
        const uint64_t nbytes = uint64_t(view.count) * uint64_t(view.info.itemsize);
        py::gil_scoped_release release;
        w.write(name, view.data, nbytes);
      }, py::arg("name"), py::arg("data"), "The next tensor's bytes (any C-contiguous buffer).")
      .def("finish", [](GgufWriter& w) {
        py::gil_scoped_release release;
        w.finish();
      }, "Pads, syncs and renames the temp file into place.")
      .def("abort", &GgufWriter::abort, "Removes the temp file; nothing is written to the target.")
      .def_property_readonly("written", &GgufWriter::written)
      .def_property_readonly("bytes_written", &GgufWriter::bytes_written)
      .def("tensor_offsets", [](const GgufWriter& w) {
        py::list out;
        for (const auto& t : w.tensors()) out.append(py::make_tuple(t.name, t.offset, t.nbytes));
        return out;
      });
}

Registrar registrar("gguf", bind);

}  // namespace
}  // namespace halo::bindings
