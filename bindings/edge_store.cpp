// halo._core.edge_store: the group store of the edge runtime (files of 4-bit neuron-group
// weights and the memory-budgeted resident set a worker computes from). python/halo/edge_store.py
// drives it. Argument translation only: keys, formats and modes are parsed by the library
// (halo/edge/group_store.hpp), arrays are taken only as the exact dtype (typed_view: no casts).
#include <memory>

#include "bindings/registry.hpp"
#include "halo/edge/group_store.hpp"

namespace halo::bindings {
namespace {

using namespace halo::edge;

using FloatArray = py::array_t<float, py::array::c_style>;

GroupKey key_from(const char* fn, const py::handle& obj) {
  try {
    const auto t = obj.cast<std::tuple<int64_t, int64_t, int64_t>>();
    return group_key(fn, std::get<0>(t), std::get<1>(t), std::get<2>(t));
  } catch (const py::cast_error&) {
    fail<TypeMismatch>(fn, "a group key must be a (layer, part, index) tuple of ints, got ",
                       std::string(py::str(py::repr(obj))));
  }
}

std::vector<GroupKey> keys_from(const char* fn, const py::iterable& keys) {
  std::vector<GroupKey> out;
  for (const auto& k : keys) out.push_back(key_from(fn, k));
  return out;
}

// An argument that must be an array of `format` (C-contiguous, native order): no conversion.
BufferView array_arg(const char* fn, const char* what, const py::handle& obj, Format format) {
  if (!PyObject_CheckBuffer(obj.ptr()))
    fail<TypeMismatch>(fn, what, " must be a C-contiguous ", format_name(format), " array, got ",
                       std::string(py::str(py::type::of(obj).attr("__name__"))));
  return typed_view(fn, what, py::reinterpret_borrow<py::buffer>(obj), format);
}

py::tuple key_tuple(GroupKey k) { return py::make_tuple(k.layer, k.part, k.index); }

// Python keeps the writer and the store behind a handle it can close deterministically.
struct Writer {
  std::unique_ptr<GroupStoreWriter> writer;
};

struct Store {
  std::unique_ptr<GroupStore> store;
  GroupStore& get() const {
    require(bool(store), "edge_store.Store", "the store is closed");
    return *store;
  }
};

Writer make_writer(const std::string& path, const std::string& meta, const py::list& layout) {
  const char* fn = "edge_store.Writer";
  std::vector<GroupSpec> specs;
  for (const auto& item : layout) {
    const auto pair = item.cast<py::tuple>();
    require(pair.size() == 2, fn, "layout entries are (key, tensors)");
    GroupSpec spec{key_from(fn, pair[0]), {}};
    for (const auto& t : pair[1].cast<py::list>()) {
      const auto fields = t.cast<std::tuple<std::string, std::string, int64_t, int64_t, int64_t>>();
      spec.tensors.push_back(TensorSpec{std::get<0>(fields), parse_store_format(fn, std::get<1>(fields)), std::get<2>(fields),
                                        std::get<3>(fields), std::get<4>(fields)});
    }
    specs.push_back(std::move(spec));
  }
  return Writer{std::make_unique<GroupStoreWriter>(path, meta, std::move(specs))};
}

void write_group(Writer& w, const py::handle& key, const py::list& tensors) {
  const char* fn = "edge_store.Writer.write_group";
  require(bool(w.writer), fn, "the writer is finished");
  // The buffers (held by `tensors`) must be C-contiguous uint8 / float32: nothing is converted.
  std::vector<TensorData> data;
  for (const auto& t : tensors) {
    const auto fields = t.cast<py::tuple>();
    require(fields.size() == 3, fn, "tensor data is (packed, absmax, values) with None for the unused ones");
    TensorData d;
    if (!fields[0].is_none()) {
      const BufferView packed = array_arg(fn, "packed", fields[0], Format::u8);
      const BufferView absmax = array_arg(fn, "absmax", fields[1], Format::f32);
      d.packed = static_cast<const uint8_t*>(packed.data);
      d.packed_bytes = packed.count;
      d.absmax = static_cast<const float*>(absmax.data);
      d.absmax_count = absmax.count;
    } else {
      const BufferView values = array_arg(fn, "values", fields[2], Format::f32);
      d.values = static_cast<const float*>(values.data);
      d.values_count = values.count;
    }
    data.push_back(d);
  }
  const GroupKey k = key_from(fn, key);
  w.writer->write_group(k, data);
}

py::dict stats_dict(const StoreStats& s) {
  py::dict d;
  d["resident_bytes"] = s.resident_bytes;
  d["peak_resident_bytes"] = s.peak_resident_bytes;
  d["pinned_bytes"] = s.pinned_bytes;
  d["bytes_read"] = s.bytes_read;
  d["loads"] = s.loads;
  d["sync_loads"] = s.sync_loads;
  d["evictions"] = s.evictions;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["failed_loads"] = s.failed_loads;
  d["read_seconds"] = s.read_seconds;
  return d;
}

py::list group_list(const GroupStore& store) {
  py::list out;
  for (const auto& g : store.groups()) {
    py::list tensors;
    for (const auto& t : g.tensors)
      tensors.append(py::make_tuple(t.name, std::string(store_format_name(t.format)), t.blocksize, t.rows, t.cols, t.offset, t.bytes));
    out.append(py::make_tuple(key_tuple(g.key), g.offset, g.bytes, store.group_pages_bytes(g.key), tensors));
  }
  return out;
}

void bind(py::module_& m) {
  m.doc() = "Group store of the edge runtime: 4-bit neuron-group weights on disk, a budgeted resident set.";
  m.attr("VERSION") = kStoreVersion;
  m.attr("ALIGNMENT") = kStoreAlignment;

  py::class_<Writer>(m, "Writer")
      .def(py::init(&make_writer), py::arg("path"), py::arg("meta"), py::arg("layout"),
           "layout: [((layer, part, index), [(name, format, blocksize, rows, cols), ...]), ...]")
      .def("write_group", &write_group, py::arg("key"), py::arg("tensors"),
           "tensors: [(packed, absmax, None) for 4-bit, (None, None, values) for f32], in layout order")
      .def("finish", [](Writer& w) {
        require(bool(w.writer), "edge_store.Writer.finish", "the writer is finished");
        {
          py::gil_scoped_release release;
          w.writer->finish();
        }
        w.writer.reset();
      })
      .def("abort", [](Writer& w) { w.writer.reset(); }, "drops the temporary file");

  py::class_<Store>(m, "Store")
      .def(py::init([](const std::string& path, std::optional<uint64_t> budget, const std::string& mode,
                       bool prefetch, bool drop_page_cache, const std::string& backend,
                       int loader_threads, double read_bandwidth) {
             StoreOptions o;
             o.mode = StoreOptions::parse_mode("edge_store.Store", mode);
             if (budget) o.budget_bytes = *budget;
             o.prefetch = prefetch;
             o.drop_page_cache = drop_page_cache;
             o.backend = parse_backend(backend);
             o.loader_threads = loader_threads;
             o.read_bandwidth = read_bandwidth;
             py::gil_scoped_release release;
             return Store{std::make_unique<GroupStore>(path, o)};
           }),
           py::arg("path"), py::arg("budget") = py::none(), py::arg("mode") = "resident", py::arg("prefetch") = true,
           py::arg("drop_page_cache") = true, py::arg("backend") = "auto",
           py::arg("loader_threads") = 4, py::arg("read_bandwidth") = 0.0)
      .def("close",
           [](Store& s) {
             py::gil_scoped_release release;
             s.store.reset();
           })
      .def_property_readonly("closed", [](const Store& s) { return !s.store; })
      .def_property_readonly("meta", [](const Store& s) { return s.get().meta(); })
      .def_property_readonly("exchanges", [](const Store& s) { return s.get().exchanges(); })
      .def("groups", [](const Store& s) { return group_list(s.get()); },
           "[((layer, part, index), offset, bytes, budget_bytes, [(name, format, blocksize, rows, cols, offset, bytes)])]")
      .def_property_readonly("budget", [](const Store& s) { return s.get().budget(); })
      .def("set_budget", [](Store& s, uint64_t budget) { s.get().set_budget(budget); })
      .def("set_held", [](Store& s, const py::iterable& keys) { s.get().set_held(keys_from("edge_store.set_held", keys)); })
      .def("set_importance",
           [](Store& s, const py::iterable& keys, const std::vector<double>& values) {
             s.get().set_importance(keys_from("edge_store.set_importance", keys), values);
           })
      .def("pin",
           [](Store& s, const py::iterable& keys) {
             const auto k = keys_from("edge_store.pin", keys);
             std::vector<GroupKey> failed;
             {
               py::gil_scoped_release release;
               failed = s.get().pin(k);
             }
             py::list out;
             for (const auto& f : failed) out.append(key_tuple(f));
             return out;
           })
      .def("unpin_all", [](Store& s) { s.get().unpin_all(); })
      .def("advance", [](Store& s, int layer, int part) { s.get().advance(layer, part); })
      .def("acquire",
           [](Store& s, const py::iterable& keys) {
             const auto k = keys_from("edge_store.acquire", keys);
             std::vector<uint8_t> got;
             {
               py::gil_scoped_release release;
               got = s.get().acquire(k);
             }
             py::list out;
             for (uint8_t g : got) out.append(py::bool_(g != 0));
             return out;
           })
      .def("load_now",
           [](Store& s, const py::handle& key) {
             const GroupKey k = key_from("edge_store.load_now", key);
             py::gil_scoped_release release;
             return s.get().load_now(k);
           })
      .def("release", [](Store& s, const py::iterable& keys) { s.get().release(keys_from("edge_store.release", keys)); })
      .def("linear",
           [](const Store& s, const py::handle& key, const std::string& name, const py::handle& x) {
             const char* fn = "edge_store.linear";
             const GroupKey k = key_from(fn, key);
             const BufferView xs = array_arg(fn, "x", x, Format::f32);
             require(xs.info.ndim == 2, fn, "x must be 2-D [rows, in], got ", xs.info.ndim, "-D");
             const TensorEntry& t = s.get().tensor(k, name);
             const int64_t rows = xs.info.shape[0], in = xs.info.shape[1];
             FloatArray y({py::ssize_t(rows), py::ssize_t(t.rows)});
             const auto* xp = static_cast<const float*>(xs.data);
             float* yp = y.mutable_data();
             {
               py::gil_scoped_release release;
               s.get().linear(k, name, xp, rows, in, yp);
             }
             return y;
           })
      .def("read_tensor",
           [](const Store& s, const py::handle& key, const std::string& name) {
             const GroupKey k = key_from("edge_store.read_tensor", key);
             const TensorEntry& t = s.get().tensor(k, name);
             FloatArray out({py::ssize_t(t.rows), py::ssize_t(t.cols)});
             float* p = out.mutable_data();
             {
               py::gil_scoped_release release;
               s.get().read_tensor(k, name, p);
             }
             return out;
           })
      .def("tensor_bytes",
           [](const Store& s, const py::handle& key, const std::string& name) {
             const auto b = s.get().tensor_bytes(key_from("edge_store.tensor_bytes", key), name);
             return py::bytes(reinterpret_cast<const char*>(b.data()), b.size());
           })
      .def("stats", [](const Store& s) { return stats_dict(s.get().stats()); })
      .def("errors",
           [](const Store& s) {
             py::list out;
             for (const auto& [k, why] : s.get().errors()) out.append(py::make_tuple(key_tuple(k), why));
             return out;
           })
      .def("resident",
           [](const Store& s) {
             py::list out;
             for (const auto& k : s.get().resident()) out.append(key_tuple(k));
             return out;
           })
      .def("wait_idle", [](const Store& s, double timeout) {
        py::gil_scoped_release release;
        return s.get().wait_idle(timeout);
      }, py::arg("timeout"));
}

static Registrar reg("edge_store", bind);

}  // namespace
}  // namespace halo::bindings
