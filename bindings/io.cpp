// halo._core.io: the safetensors reader (zero-copy NumPy views of the mapping)
// and the streaming writer.
#include <memory>

#include "bindings/registry.hpp"
#include "halo/io/convert.hpp"
#include "halo/io/safetensors.hpp"

namespace halo::bindings {
namespace {

using halo::io::SafetensorsFile;
using halo::io::SafetensorsWriter;
using halo::io::StDType;

// NumPy dtype holding a safetensors dtype's bytes (bfloat16 and float8 as raw bits).
py::dtype numpy_dtype(StDType d) {
  switch (d) {
    case StDType::F64: return py::dtype("float64");
    case StDType::F32: return py::dtype("float32");
    case StDType::F16: return py::dtype("float16");
    case StDType::BF16: return py::dtype("uint16");
    case StDType::I64: return py::dtype("int64");
    case StDType::I32: return py::dtype("int32");
    case StDType::I16: return py::dtype("int16");
    case StDType::I8: return py::dtype("int8");
    case StDType::BOOL: return py::dtype("bool");
    default: return py::dtype("uint8");
  }
}

py::array view_tensor(const std::shared_ptr<SafetensorsFile>& file, const std::string& name) {
  const auto& info = file->info(name);
  std::vector<py::ssize_t> shape(info.shape.begin(), info.shape.end());
  // The capsule owns a reference to the mapping so the view outlives the Python file object.
  auto* keep = new std::shared_ptr<SafetensorsFile>(file);
  py::capsule owner(keep, [](void* p) { delete static_cast<std::shared_ptr<SafetensorsFile>*>(p); });
  py::array out(numpy_dtype(info.dtype), shape, file->data(info), owner);
  out.attr("setflags")(py::arg("write") = false);
  return out;
}

// F32/F16/BF16/F64 <-> float32 (halo::io::convert_*), for the merge's float32 working copies.
StDType float_dtype(const char* fn, const std::string& dtype) {
  const StDType d = halo::io::parse_dtype_name(dtype);
  require(halo::io::is_float_dtype(d), fn, "dtype must be F32, F16, BF16 or F64, got ", dtype);
  return d;
}

py::array to_float32(const py::buffer& data, const std::string& dtype) {
  const char* fn = "to_float32";
  const StDType d = float_dtype(fn, dtype);
  const BufferView v = contiguous_view(fn, "data", data, halo::io::dtype_size(d));
  py::array_t<float> out(v.count);
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    halo::io::convert_to_float32(v.data, d, v.count, dst);
  }
  return out;
}

py::array from_float32(const py::buffer& data, const std::string& dtype) {
  const char* fn = "from_float32";
  const StDType d = float_dtype(fn, dtype);
  const BufferView v = contiguous_view(fn, "data", data, 4);
  py::array out(numpy_dtype(d), std::vector<py::ssize_t>{py::ssize_t(v.count)});
  void* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    halo::io::convert_from_float32(static_cast<const float*>(v.data), v.count, d, dst);
  }
  return out;
}

void bind(py::module_& m) {
  m.def("to_float32", &to_float32, py::arg("data"), py::arg("dtype"),
        "Flat float32 copy of F32/F16/BF16(uint16 bits)/F64 data.");
  m.def("from_float32", &from_float32, py::arg("data"), py::arg("dtype"),
        "Flat F32/F16/BF16(uint16 bits)/F64 copy of float32 data (round to nearest even).");
  py::class_<SafetensorsFile, std::shared_ptr<SafetensorsFile>>(m, "SafetensorsFile",
                                                                "A memory-mapped, validated safetensors file.")
      .def_property_readonly("path", &SafetensorsFile::path)
      .def_property_readonly("metadata", &SafetensorsFile::metadata)
      .def_property_readonly("file_size", &SafetensorsFile::file_size)
      .def_property_readonly("copied", &SafetensorsFile::copied)
      .def("names", [](const SafetensorsFile& f) {
        std::vector<std::string> out;
        for (const auto& t : f.tensors()) out.push_back(t.name);
        return out;
      }, "Tensor names in file (offset) order.")
      .def("__contains__", &SafetensorsFile::contains)
      .def("release_pages", &SafetensorsFile::release_pages,
           "Drops the mapping's resident pages from this process (views stay valid).")
      .def("info", [](const SafetensorsFile& f, const std::string& name) {
        const auto& t = f.info(name);
        return py::make_tuple(std::string(halo::io::dtype_name(t.dtype)), t.shape, t.begin, t.end);
      }, py::arg("name"), "(dtype, shape, begin, end) of a tensor.")
      .def("get", &view_tensor, py::arg("name"),
           "A read-only zero-copy NumPy view (BF16 as uint16 bits, F8 as uint8).");

  m.def(
      "open_safetensors",
      [](const std::string& path, bool copy) {
        py::gil_scoped_release release;
        return SafetensorsFile::open(path, copy ? halo::io::LoadMode::copy : halo::io::LoadMode::map);
      },
      py::arg("path"), py::arg("copy") = false,
      "Maps (copy=True: reads into private memory) and validates a safetensors file "
      "(ValueError naming the file and problem).");

  m.def(
      "parse_header",
      [](const std::string& json, uint64_t data_size, const std::string& source) {
        auto h = halo::io::parse_header(json, data_size, source);
        py::list tensors;
        for (const auto& t : h.tensors)
          tensors.append(py::make_tuple(t.name, std::string(halo::io::dtype_name(t.dtype)), t.shape, t.begin, t.end));
        return py::make_tuple(tensors, h.metadata);
      },
      py::arg("json"), py::arg("data_size"), py::arg("source") = "<header>",
      "Validates header JSON for a data section of data_size bytes: ([(name, dtype, shape, begin, end)], metadata).");

  py::class_<SafetensorsWriter>(m, "SafetensorsWriter", "Streams tensors into a safetensors file (temp + rename).")
      .def(py::init([](const std::string& path, const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>>& specs,
                       const std::map<std::string, std::string>& metadata, bool durable) {
             std::vector<halo::io::TensorSpec> out;
             for (const auto& [name, dtype, shape] : specs)
               out.push_back({name, halo::io::parse_dtype_name(dtype), shape});
             return std::make_unique<SafetensorsWriter>(path, std::move(out), metadata, durable);
           }),
           py::arg("path"), py::arg("specs"), py::arg("metadata"), py::arg("durable") = true)
      .def("write", [](SafetensorsWriter& w, const std::string& name, const py::buffer& data) {
        const BufferView view = contiguous_view("SafetensorsWriter.write", name, data, data.request().itemsize);
        const uint64_t nbytes = uint64_t(view.count) * uint64_t(view.info.itemsize);
        py::gil_scoped_release release;
        w.write(name, view.data, nbytes);
      }, py::arg("name"), py::arg("data"))
      .def("finish", &SafetensorsWriter::finish, py::call_guard<py::gil_scoped_release>(),
           "fsyncs (unless durable=False) and renames the temp file into place.")
      .def_property_readonly("written", &SafetensorsWriter::written);
}

Registrar registrar("io", bind);

}  // namespace
}  // namespace halo::bindings
