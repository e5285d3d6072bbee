// The kernel inventory behind halo.kernels() and the error for a missing entry.
#include "halo/backend/dispatch.hpp"

#include <algorithm>
#include <mutex>

namespace halo {
namespace {
std::mutex& inventory_mutex() {
  static std::mutex m;
  return m;
}
std::vector<KernelInventoryEntry>& inventory() {
  static std::vector<KernelInventoryEntry> entries;
  return entries;
}
}  // namespace

namespace detail {
void no_kernel(std::string_view op, Backend backend) {
  fail<BackendUnavailable>(op, "has no '", backend_name(backend), "' kernel in this build");
}
void register_kernel(std::string_view op, std::vector<Backend> backends) {
  std::lock_guard lock(inventory_mutex());
  inventory().push_back({std::string(op), std::move(backends)});
}
}  // namespace detail

std::vector<KernelInventoryEntry> kernel_inventory() {
  std::lock_guard lock(inventory_mutex());
  std::vector<KernelInventoryEntry> out = inventory();
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.op < b.op; });
  return out;
}

}  // namespace halo
