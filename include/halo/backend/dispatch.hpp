// The kernel registry: one table of implementations per operation, one way to
// choose among them.
//
// A table is a list of entries (variants), each with a name, the backend rung it runs
// on (scalar <- avx2 <- avx512, or cuda apart) and any CPU feature it needs beyond its
// rung (AVX512-BF16, AMX-BF16, AVX512-VNNI, AVX-VNNI). Entries are listed best last within a rung
// (entries given a null function are left out):
//   const KernelTable<Fn> kOp{"op_name", {rung(Backend::scalar, op_scalar),
//                                         rung(Backend::avx512, op_avx512),
//                                         variant("avx512-amx", Backend::avx512, CpuFeature::amx_bf16, op_amx)}};
//   const KernelRegistration reg(kOp);   // for halo.kernels()
// `dispatch` resolves a request through halo::resolve (the one place that knows the CPU,
// the build and HALO_BACKEND) and returns one entry:
//   - an explicit backend (scalar, avx2, avx512 or cuda) gets the best entry of exactly
//     that rung whose feature this machine has, or BackendUnavailable naming the operation;
//   - an explicit variant (`dispatch(table, "avx512-amx")`, or a ScopedKernelChoice) gets
//     exactly that entry, or BackendUnavailable naming the operation and why;
//   - `automatic` (and a HALO_BACKEND pin) takes the best available entry at or below the
//     resolved rung: a CPU that runs avx512 runs the rungs below.
// `Dispatched::variant` says which entry runs, so nothing falls back silently.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include "halo/backend/backend.hpp"
#include "halo/core/error.hpp"

namespace halo {

// A CPU feature a kernel variant needs beyond the instructions of its rung.
enum class CpuFeature : uint8_t { none, avx512_bf16, amx_bf16, avx512_vnni, avx_vnni };
std::string_view cpu_feature_name(CpuFeature feature);
// "" when this CPU (and OS) has it and it is not switched off; HALO_DISABLE_AVX512_BF16=1,
// HALO_DISABLE_AMX=1, HALO_DISABLE_AVX512_VNNI=1 / HALO_DISABLE_AVX_VNNI=1 (read on every call)
// switch a feature off, so tests and benchmarks can compare a variant with the entry below it.
std::string cpu_feature_unavailable_reason(CpuFeature feature);
// What the hardware has, ignoring the HALO_DISABLE_* switches (checked once).
bool cpu_has(CpuFeature feature);

template <typename Fn>
struct KernelEntry {
  std::string_view variant;  // "scalar", "avx2", "avx512", "avx512-bf16", "avx512-amx", "cuda", ...
  Backend backend = Backend::scalar;
  CpuFeature feature = CpuFeature::none;
  Fn fn = nullptr;
};

// The entry of a rung: named as the backend.
template <typename Fn>
constexpr KernelEntry<Fn> rung(Backend backend, Fn fn) {
  constexpr std::array<std::string_view, 5> names = {"auto", "scalar", "avx2", "avx512", "cuda"};
  return {names[size_t(backend)], backend, CpuFeature::none, fn};
}
// An entry on top of a rung that needs a CPU feature.
template <typename Fn>
constexpr KernelEntry<Fn> variant(std::string_view name, Backend backend, CpuFeature feature, Fn fn) {
  return {name, backend, feature, fn};
}

inline constexpr size_t kMaxKernelVariants = 8;

template <typename Fn>
struct KernelTable {
  std::string_view op;
  std::array<KernelEntry<Fn>, kMaxKernelVariants> entries{};
  size_t count = 0;

  constexpr KernelTable(std::string_view name, std::initializer_list<KernelEntry<Fn>> list) : op(name) {
    for (const KernelEntry<Fn>& e : list) {  // entries without a function are dropped
      if (e.fn == nullptr) continue;
      if (count == kMaxKernelVariants) throw std::length_error("KernelTable: too many variants");
      entries[count++] = e;
    }
  }
  constexpr const KernelEntry<Fn>* begin() const { return entries.data(); }
  constexpr const KernelEntry<Fn>* end() const { return entries.data() + count; }
  constexpr const KernelEntry<Fn>* find(std::string_view name) const {
    for (const KernelEntry<Fn>& e : *this)
      if (e.variant == name) return &e;
    return nullptr;
  }
};

template <typename Fn>
struct Dispatched {
  Fn kernel;
  Backend backend;
  std::string_view variant;
};

// Within this thread's scope, dispatch of `op` with backend `automatic` takes exactly the
// entry `variant` (BackendUnavailable when it is missing or cannot run here): how a test
// or a benchmark runs one entry through a public function.
class ScopedKernelChoice {
 public:
  ScopedKernelChoice(std::string op, std::string variant);
  ~ScopedKernelChoice();
  ScopedKernelChoice(const ScopedKernelChoice&) = delete;
  ScopedKernelChoice& operator=(const ScopedKernelChoice&) = delete;
};

namespace detail {
[[noreturn]] void no_kernel(std::string_view op, Backend backend);
[[noreturn]] void backend_unavailable(std::string_view op, Backend backend, const std::string& why);
[[noreturn]] void no_variant(std::string_view op, std::string_view variant, std::string_view have);
[[noreturn]] void variant_unavailable(std::string_view op, std::string_view variant, const std::string& why);
// The variant chosen for `op` by a ScopedKernelChoice of this thread ("" when none).
std::string_view chosen_variant(std::string_view op);
bool rung_below_or_equal(Backend entry, Backend resolved);
}  // namespace detail

// Why `entry` cannot run here ("" when it can).
template <typename Fn>
std::string entry_unavailable_reason(const KernelEntry<Fn>& entry) {
  if (std::string why = backend_unavailable_reason(entry.backend); !why.empty()) return why;
  return cpu_feature_unavailable_reason(entry.feature);
}

// Exactly the entry named `variant`.
template <typename Fn>
Dispatched<Fn> dispatch(const KernelTable<Fn>& table, std::string_view variant) {
  const KernelEntry<Fn>* e = table.find(variant);
  if (e == nullptr) {
    std::string have;
    for (const KernelEntry<Fn>& x : table) have += (have.empty() ? "" : ", ") + std::string(x.variant);
    detail::no_variant(table.op, variant, have);
  }
  if (std::string why = entry_unavailable_reason(*e); !why.empty()) detail::variant_unavailable(table.op, variant, why);
  return {e->fn, e->backend, e->variant};
}

template <typename Fn>
Dispatched<Fn> dispatch(const KernelTable<Fn>& table, Backend requested) {
  if (requested == Backend::automatic)
    if (std::string_view chosen = detail::chosen_variant(table.op); !chosen.empty()) return dispatch(table, chosen);
  if (requested != Backend::automatic)
    if (std::string why = backend_unavailable_reason(requested); !why.empty())
      detail::backend_unavailable(table.op, requested, why);
  const Backend resolved = resolve(requested);
  const bool exact = requested != Backend::automatic || resolved == Backend::cuda;
  const KernelEntry<Fn>* best = nullptr;
  for (const KernelEntry<Fn>& e : table) {
    const bool fits = exact ? e.backend == resolved : detail::rung_below_or_equal(e.backend, resolved);
    if (!fits || (e.feature != CpuFeature::none && !cpu_feature_unavailable_reason(e.feature).empty())) continue;
    if (best == nullptr || e.backend >= best->backend) best = &e;  // later entries of a rung are better
  }
  if (best == nullptr) detail::no_kernel(table.op, resolved);
  return {best->fn, best->backend, best->variant};
}

// For halo.kernels(): every table registers its name and its entries.
struct KernelVariantInfo {
  std::string variant;
  Backend backend;
  CpuFeature feature;
};
struct KernelInventoryEntry {
  std::string op;
  std::vector<Backend> backends;           // rungs with at least one entry, in ladder order
  std::vector<KernelVariantInfo> variants;  // every entry, in table order
  // Whether this variant can run here ("" when it can, else why not).
  std::string unavailable_reason(const KernelVariantInfo& v) const;
};
std::vector<KernelInventoryEntry> kernel_inventory();

namespace detail {
void register_kernel(std::string_view op, std::vector<KernelVariantInfo> variants);
}

// Registers a table for the inventory at static-initialization time:
//   static const KernelTable<F> kTable{...};
//   static const KernelRegistration reg(kTable);
struct KernelRegistration {
  template <typename Fn>
  explicit KernelRegistration(const KernelTable<Fn>& table) {
    std::vector<KernelVariantInfo> variants;
    for (const KernelEntry<Fn>& e : table) variants.push_back({std::string(e.variant), e.backend, e.feature});
    detail::register_kernel(table.op, std::move(variants));
  }
};

}  // namespace halo
