// halo._core.io: the safetensors reader (zero-copy NumPy views of the mapping)
// and the streaming writer.
#include <memory>

#include "bindings/registry.hpp"
#include "halo/io/safetensors.hpp"

namespace halo::bindings {
namespace {

using halo::io::SafetensorsFile;
using halo::io::SafetensorsWriter;

// NumPy dtype holding a tensor's bytes (bfloat16 and float8 as raw bits).
py::dtype numpy_dtype(Format format) {
  if (format == Format::bf16) return py::dtype("uint16");
  if (is_float(format) && element_size(format) == 1) return py::dtype("uint8");
  return py::dtype(std::string(traits(format).numpy));
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

// Whole-tensor conversions for the merge's float32 working copies (NumPy has no
// bfloat16 and its casts are single-threaded): the format table's row codecs.
py::array to_float32(const py::buffer& data, const std::string& dtype) {
  const char* fn = "to_float32";
  const Format format = parse_safetensors_dtype(fn, dtype);
  require(is_float(format) && row_codec(format).to_float, fn, "dtype must be a float dtype, got ", dtype);
  const BufferView v = typed_view(fn, "data", data, format);
  py::array_t<float> out(v.count);
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    to_float(format, v.data, dst, v.count);
  }
  return out;
}

py::array from_float32(const py::buffer& data, const std::string& dtype) {
  const char* fn = "from_float32";
  const Format format = parse_safetensors_dtype(fn, dtype);
  require(is_float(format) && row_codec(format).from_float, fn, "dtype must be F32, F16, BF16 or F64, got ", dtype);
  const BufferView v = typed_view(fn, "data", data, Format::f32);
  py::array out(numpy_dtype(format), std::vector<py::ssize_t>{py::ssize_t(v.count)});
  void* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    from_float(format, static_cast<const float*>(v.data), dst, v.count);
  }
  return out;
}

void bind(py::module_& m) {
  m.def("to_float32", &to_float32, py::arg("data"), py::arg("dtype"),
        "Flat float32 copy of float data (F32, F16, BF16 as uint16 bits, F64, F8 as uint8 bits).");
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
               out.push_back({name, parse_safetensors_dtype("SafetensorsWriter", dtype), shape});
             return std::make_unique<SafetensorsWriter>(path, std::move(out), metadata, durable);
           }),
           py::arg("path"), py::arg("specs"), py::arg("metadata"), py::arg("durable") = true)
      .def("write", [](SafetensorsWriter& w, const std::string& name, const py::buffer& data) {
        const BufferView view = byte_view("SafetensorsWriter.write", name, data);
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
