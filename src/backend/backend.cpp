#include "halo/backend/backend.hpp"

#include <cassert>
#include <cstdlib>

#include <xsimd/xsimd.hpp>

#include "halo/core/error.hpp"
#include "src/cuda/cuda_api.hpp"

namespace halo {

std::string_view backend_name(Backend backend) {
  switch (backend) {
    case Backend::automatic: return "auto";
    case Backend::scalar: return "scalar";
    case Backend::avx2: return "avx2";
    case Backend::avx512: return "avx512";
    case Backend::cuda: return "cuda";
  }
  return "?";
}

Backend parse_backend(std::string_view name) {
  for (Backend b : {Backend::automatic, Backend::scalar, Backend::avx2, Backend::avx512, Backend::cuda})
    if (name == backend_name(b)) return b;
  fail("parse_backend", "unknown backend '", name, "'; expected one of auto, scalar, avx2, avx512, cuda");
}

bool built_with_cuda() { return cuda::compiled(); }

std::string backend_unavailable_reason(Backend backend) {
  const auto cpu = xsimd::available_architectures();
  switch (backend) {
    case Backend::automatic:
    case Backend::scalar: return "";
    case Backend::avx2:
      return cpu.avx2 && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")
                 ? ""
                 : "this CPU lacks AVX2/FMA/F16C";
    case Backend::avx512: return cpu.avx512bw && cpu.avx512dq && __builtin_cpu_supports("avx512vl") ? "" : "this CPU lacks AVX-512 (F, BW, DQ, VL)";
    case Backend::cuda: return cuda::unavailable_reason();
  }
  return "unknown backend";
}

bool backend_available(Backend backend) { return backend_unavailable_reason(backend).empty(); }

std::vector<Backend> available_backends() {
  std::vector<Backend> out;
  for (Backend b : {Backend::scalar, Backend::avx2, Backend::avx512, Backend::cuda})
    if (backend_available(b)) out.push_back(b);
  return out;
}

Backend resolve(Backend requested) {
  if (requested == Backend::automatic) {
    if (const char* env = std::getenv("HALO_BACKEND"); env && *env) {
      Backend pinned = parse_backend(env);
      if (pinned != Backend::automatic) return resolve(pinned);
    }
    if (backend_available(Backend::avx512)) return Backend::avx512;
    if (backend_available(Backend::avx2)) return Backend::avx2;
    return Backend::scalar;
  }
  if (std::string why = backend_unavailable_reason(requested); !why.empty())
    fail<BackendUnavailable>("resolve", "backend '", backend_name(requested), "' is not available: ", why);
  return requested;
}

}  // namespace halo
