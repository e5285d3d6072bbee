#include "bindings/registry.hpp"
#include "halo/backend/backend.hpp"
#include "halo/backend/dispatch.hpp"
#include "halo/core/parallel.hpp"

namespace halo::bindings {
namespace {

void bind(py::module_& m) {
  m.def("backends", [] {
    std::vector<std::string> names;
    for (Backend b : available_backends()) names.emplace_back(backend_name(b));
    return names;
  }, "Backends this build can run on this machine.");
  m.def("resolve", [](const std::string& name) { return std::string(backend_name(resolve(parse_backend(name)))); },
        py::arg("name"), "The concrete backend a request runs on (honours HALO_BACKEND for 'auto').");
  m.def("built_with_cuda", &built_with_cuda);
  m.def("unavailable_reason", [](const std::string& name) { return backend_unavailable_reason(parse_backend(name)); },
        py::arg("name"));
  m.def("num_threads", &num_threads);
  m.def("kernels", [] {
    py::dict out;
    for (const KernelInventoryEntry& entry : kernel_inventory()) {
      std::vector<std::string> names;
      for (const KernelVariantInfo& v : entry.variants) names.push_back(v.variant);
      out[py::str(entry.op)] = names;
    }
    return out;
  }, "Every registered kernel table: operation -> its entries (a backend rung such as 'avx512', or a variant "
     "on top of one such as 'avx512-amx'), in ladder order.");
  m.def("kernel_variants", [] {
    py::dict out;
    for (const KernelInventoryEntry& entry : kernel_inventory()) {
      py::list rows;
      for (const KernelVariantInfo& v : entry.variants)
        rows.append(py::make_tuple(v.variant, std::string(backend_name(v.backend)),
                                   std::string(cpu_feature_name(v.feature)), entry.unavailable_reason(v)));
      out[py::str(entry.op)] = rows;
    }
    return out;
  }, "operation -> [(variant, backend, cpu feature or '', why it cannot run here or '')].");
}

Registrar registrar("backend", bind);

}  // namespace
}  // namespace halo::bindings
