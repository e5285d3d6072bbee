// Backend policy: which implementation of a kernel runs.
//
// Tags form a ladder scalar <- avx2 <- avx512 (a CPU that runs avx512 runs the
// rungs below it); cuda stands apart. `resolve` is the one dispatch point every
// kernel family goes through: `automatic` means the HALO_BACKEND environment
// variable when set, otherwise the best CPU rung this machine supports. Asking
// for a backend this build or this machine cannot run throws BackendUnavailable.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace halo {

enum class Backend { automatic, scalar, avx2, avx512, cuda };

std::string_view backend_name(Backend backend);

// "auto", "scalar", "avx2", "avx512", "cuda"; anything else throws InvalidArgument.
Backend parse_backend(std::string_view name);

// What this build on this machine can run, best CPU rung last, cuda (if any) after it.
std::vector<Backend> available_backends();
bool backend_available(Backend backend);

// Why a backend is not available ("" when it is).
std::string backend_unavailable_reason(Backend backend);

// The concrete backend a request runs on. Never returns `automatic`.
Backend resolve(Backend requested);

// Whether this build has the CUDA backend compiled in (a GPU may still be absent).
bool built_with_cuda();

}  // namespace halo
