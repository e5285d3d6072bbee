// The kernel inventory behind halo.kernels(), the CPU features of kernel variants, the
// per-thread variant choice and the errors for a missing entry.
#include "halo/backend/dispatch.hpp"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>

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

// This thread's ScopedKernelChoice stack: (op, variant), innermost last.
thread_local std::vector<std::pair<std::string, std::string>> t_choices;

bool disabled(const char* variable) {
  const char* value = std::getenv(variable);
  return value != nullptr && *value != '\0' && std::strcmp(value, "0") != 0;
}

uint64_t xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

// Linux hands out the AMX register file only on request (arch_prctl, kernel >= 5.16).
bool request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

bool has_avx512_bf16() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!backend_available(Backend::avx512) || !__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    return (a & (1u << 5)) != 0;
  }();
  return has;
}

bool has_amx_bf16() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!backend_available(Backend::avx512) || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d & (1u << 24)) != 0, bf16 = (d & (1u << 22)) != 0;
    if (!tile || !bf16 || !has_avx512_bf16()) return false;  // AMX kernels convert panels with AVX512-BF16
    const uint64_t tile_state = (uint64_t(1) << 17) | (uint64_t(1) << 18);
    if ((xcr0() & tile_state) != tile_state) return false;
    return request_amx_permission();
  }();
  return has;
}

// AVX512-VNNI (vpdpbusd on zmm): CPUID.(7,0):ECX bit 11.
bool has_avx512_vnni() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!backend_available(Backend::avx512) || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return (c & (1u << 11)) != 0;
  }();
  return has;
}

// AVX-VNNI (the VEX-encoded vpdpbusd on ymm, Alder Lake / Sapphire Rapids / Zen 5): CPUID.(7,1):EAX bit 4.
bool has_avx_vnni() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!backend_available(Backend::avx2) || !__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    return (a & (1u << 4)) != 0;
  }();
  return has;
}

}  // namespace

std::string_view cpu_feature_name(CpuFeature feature) {
  switch (feature) {
    case CpuFeature::none: return "";
    case CpuFeature::avx512_bf16: return "avx512_bf16";
    case CpuFeature::amx_bf16: return "amx_bf16";
    case CpuFeature::avx512_vnni: return "avx512_vnni";
    case CpuFeature::avx_vnni: return "avx_vnni";
  }
  return "?";
}

bool cpu_has(CpuFeature feature) {
  switch (feature) {
    case CpuFeature::none: return true;
    case CpuFeature::avx512_bf16: return has_avx512_bf16();
    case CpuFeature::amx_bf16: return has_amx_bf16();
    case CpuFeature::avx512_vnni: return has_avx512_vnni();
    case CpuFeature::avx_vnni: return has_avx_vnni();
  }
  return false;
}

std::string cpu_feature_unavailable_reason(CpuFeature feature) {
  switch (feature) {
    case CpuFeature::none: return "";
    case CpuFeature::avx512_bf16:
      if (!has_avx512_bf16()) return "this CPU lacks AVX512-BF16";
      return disabled("HALO_DISABLE_AVX512_BF16") ? "switched off by HALO_DISABLE_AVX512_BF16" : "";
    case CpuFeature::amx_bf16:
      if (!has_amx_bf16()) return "this CPU (or OS) lacks AMX-BF16";
      return disabled("HALO_DISABLE_AMX") ? "switched off by HALO_DISABLE_AMX" : "";
    case CpuFeature::avx512_vnni:
      if (!has_avx512_vnni()) return "this CPU lacks AVX512-VNNI";
      return disabled("HALO_DISABLE_AVX512_VNNI") ? "switched off by HALO_DISABLE_AVX512_VNNI" : "";
    case CpuFeature::avx_vnni:
      if (!has_avx_vnni()) return "this CPU lacks AVX-VNNI";
      return disabled("HALO_DISABLE_AVX_VNNI") ? "switched off by HALO_DISABLE_AVX_VNNI" : "";
  }
  return "unknown CPU feature";
}

ScopedKernelChoice::ScopedKernelChoice(std::string op, std::string variant) {
  t_choices.emplace_back(std::move(op), std::move(variant));
}
ScopedKernelChoice::~ScopedKernelChoice() { t_choices.pop_back(); }

namespace detail {
void no_kernel(std::string_view op, Backend backend) {
  fail<BackendUnavailable>(op, "has no '", backend_name(backend), "' kernel in this build");
}
void backend_unavailable(std::string_view op, Backend backend, const std::string& why) {
  fail<BackendUnavailable>(op, "backend '", backend_name(backend), "' is not available: ", why);
}
void no_variant(std::string_view op, std::string_view variant, std::string_view have) {
  fail<BackendUnavailable>(op, "has no kernel variant '", variant, "'; it has ", have);
}
void variant_unavailable(std::string_view op, std::string_view variant, const std::string& why) {
  fail<BackendUnavailable>(op, "kernel variant '", variant, "' cannot run here: ", why);
}
std::string_view chosen_variant(std::string_view op) {
  for (auto it = t_choices.rbegin(); it != t_choices.rend(); ++it)
    if (it->first == op) return it->second;
  return {};
}
bool rung_below_or_equal(Backend entry, Backend resolved) {
  return entry != Backend::cuda && entry != Backend::automatic && entry <= resolved;
}
void register_kernel(std::string_view op, std::vector<KernelVariantInfo> variants) {
  KernelInventoryEntry entry{std::string(op), {}, std::move(variants)};
  for (Backend b : {Backend::scalar, Backend::avx2, Backend::avx512, Backend::cuda})
    if (std::any_of(entry.variants.begin(), entry.variants.end(), [&](const auto& v) { return v.backend == b; }))
      entry.backends.push_back(b);
  std::lock_guard lock(inventory_mutex());
  inventory().push_back(std::move(entry));
}
}  // namespace detail

std::string KernelInventoryEntry::unavailable_reason(const KernelVariantInfo& v) const {
  if (std::string why = backend_unavailable_reason(v.backend); !why.empty()) return why;
  return cpu_feature_unavailable_reason(v.feature);
}

std::vector<KernelInventoryEntry> kernel_inventory() {
  std::lock_guard lock(inventory_mutex());
  std::vector<KernelInventoryEntry> out = inventory();
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.op < b.op; });
  return out;
}

}  // namespace halo
