// The kernel registry: one table of implementations per operation, one way to
// choose among them.
//
// Each operation declares a KernelTable with an entry per backend; the per-ISA
// translation units define the entries (a null entry means "no kernel for this
// backend"). `dispatch` resolves the request through halo::resolve (the one
// place that knows the CPU, the build and HALO_BACKEND) and returns the kernel:
//   - an explicit request (backend= scalar, avx2, avx512 or cuda) gets exactly that
//     kernel or BackendUnavailable naming the operation;
//   - `automatic` (and a HALO_BACKEND pin) takes the best CPU rung at or below the
//     resolved one that has a kernel: a CPU that runs avx512 runs the rungs below.
// `Dispatched::backend` says which one runs, so nothing falls back silently:
// halo.kernels() lists every table and its entries.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "halo/backend/backend.hpp"
#include "halo/core/error.hpp"

namespace halo {

template <typename Fn>
struct KernelTable {
  std::string_view op;
  Fn scalar = nullptr;
  Fn avx2 = nullptr;
  Fn avx512 = nullptr;
  Fn cuda = nullptr;

  Fn entry(Backend backend) const {
    switch (backend) {
      case Backend::scalar: return scalar;
      case Backend::avx2: return avx2;
      case Backend::avx512: return avx512;
      case Backend::cuda: return cuda;
      default: return nullptr;
    }
  }
};

template <typename Fn>
struct Dispatched {
  Fn kernel;
  Backend backend;
};

namespace detail {
[[noreturn]] void no_kernel(std::string_view op, Backend backend);
}

template <typename Fn>
Dispatched<Fn> dispatch(const KernelTable<Fn>& table, Backend requested) {
  const Backend resolved = resolve(requested);
  if (Fn kernel = table.entry(resolved)) return {kernel, resolved};
  if (requested == Backend::automatic && resolved != Backend::cuda) {
    for (Backend lower : {Backend::avx2, Backend::scalar}) {
      if (lower >= resolved) continue;
      if (Fn kernel = table.entry(lower)) return {kernel, lower};
    }
  }
  detail::no_kernel(table.op, resolved);
}

// For halo.kernels(): every table registers its name and which backends it has.
struct KernelInventoryEntry {
  std::string op;
  std::vector<Backend> backends;
};
std::vector<KernelInventoryEntry> kernel_inventory();

namespace detail {
void register_kernel(std::string_view op, std::vector<Backend> backends);
}

// Registers a table for the inventory at static-initialization time:
//   static const KernelTable<F> kTable{...};
//   static const KernelRegistration reg(kTable);
struct KernelRegistration {
  template <typename Fn>
  explicit KernelRegistration(const KernelTable<Fn>& table) {
    std::vector<Backend> have;
    for (Backend b : {Backend::scalar, Backend::avx2, Backend::avx512, Backend::cuda})
      if (table.entry(b)) have.push_back(b);
    detail::register_kernel(table.op, std::move(have));
  }
};

}  // namespace halo
