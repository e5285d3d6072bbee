// halo._core.io: the safetensors reader (zero-copy NumPy views of the mapping)
// and the streaming writer.
#include <memory>

#include "bindings/registry.hpp"
#include "halo/core/dtype.hpp"
#include "halo/core/parallel.hpp"
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

constexpr int64_t kGrain = 1 << 16;

// Element-wise conversions for the merge's float32 working copies, done here in
// parallel because NumPy has no bfloat16 and its casts are single-threaded.
py::array to_float32(const py::buffer& data, const std::string& dtype) {
  const char* fn = "to_float32";
  const StDType d = halo::io::parse_dtype_name(dtype);
  require(d == StDType::F32 || d == StDType::F16 || d == StDType::BF16 || d == StDType::F64, fn,
          "dtype must be F32, F16, BF16 or F64, got ", dtype);
  const BufferView v = contiguous_view(fn, "data", data, halo::io::dtype_size(d));
  py::array_t<float> out(v.count);
  float* dst = out.mutable_data();
  const void* src = v.data;
  {
    py::gil_scoped_release release;
    parallel_for(v.count, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        switch (d) {
          case StDType::F32: dst[i] = static_cast<const float*>(src)[i]; break;
          case StDType::F16: dst[i] = f16_to_float(static_cast<const uint16_t*>(src)[i]); break;
          case StDType::BF16: dst[i] = bf16_to_float(static_cast<const uint16_t*>(src)[i]); break;
          default: dst[i] = float(static_cast<const double*>(src)[i]); break;
        }
      }
    });
  }
  return out;
}

py::array from_float32(const py::buffer& data, const std::string& dtype) {
  const char* fn = "from_float32";
  const StDType d = halo::io::parse_dtype_name(dtype);
  require(d == StDType::F32 || d == StDType::F16 || d == StDType::BF16 || d == StDType::F64, fn,
          "dtype must be F32, F16, BF16 or F64, got ", dtype);
  const BufferView v = contiguous_view(fn, "data", data, 4);
  py::array out(numpy_dtype(d), std::vector<py::ssize_t>{py::ssize_t(v.count)});
  void* dst = out.mutable_data();
  const float* src = static_cast<const float*>(v.data);
  {
    py::gil_scoped_release release;
    parallel_for(v.count, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        switch (d) {
          case StDType::F32: static_cast<float*>(dst)[i] = src[i]; break;
          case StDType::F16: static_cast<uint16_t*>(dst)[i] = float_to_f16(src[i]); break;
          case StDType::BF16: static_cast<uint16_t*>(dst)[i] = float_to_bf16(src[i]); break;
          default: static_cast<double*>(dst)[i] = double(src[i]); break;
        }
      }
    });
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
      [](const std::string& path) {
        py::gil_scoped_release release;
        return SafetensorsFile::open(path);
      },
      py::arg("path"), "Maps and validates a safetensors file (ValueError naming the file and problem).");

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
                       const std::map<std::string, std::string>& metadata) {
             std::vector<halo::io::TensorSpec> out;
             for (const auto& [name, dtype, shape] : specs)
               out.push_back({name, halo::io::parse_dtype_name(dtype), shape});
             return std::make_unique<SafetensorsWriter>(path, std::move(out), metadata);
           }),
           py::arg("path"), py::arg("specs"), py::arg("metadata"))
      .def("write", [](SafetensorsWriter& w, const std::string& name, const py::buffer& data) {
        const BufferView view = contiguous_view("SafetensorsWriter.write", name, data, data.request().itemsize);
        const uint64_t nbytes = uint64_t(view.count) * uint64_t(view.info.itemsize);
        py::gil_scoped_release release;
        w.write(name, view.data, nbytes);
      }, py::arg("name"), py::arg("data"))
      .def("finish", &SafetensorsWriter::finish)
      .def_property_readonly("written", &SafetensorsWriter::written);
}

Registrar registrar("io", bind);

}  // namespace
}  // namespace halo::bindings
