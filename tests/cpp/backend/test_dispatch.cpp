// The kernel registry's choice rules.
#include <catch2/catch.hpp>

#include <cstdlib>

#include "halo/backend/dispatch.hpp"
#include "halo/lora/linear.hpp"
#include "halo/quant/quant4.hpp"

using namespace halo;

namespace {
int scalar_kernel() { return 1; }
int avx2_kernel() { return 2; }
int avx512_kernel() { return 3; }
using Kernel = int (*)();
}  // namespace

TEST_CASE("an explicit backend gets exactly its kernel or an error naming the op", "[dispatch]") {
  const KernelTable<Kernel> only_scalar{"test_op", {rung(Backend::scalar, &scalar_kernel)}};
  CHECK(dispatch(only_scalar, Backend::scalar).kernel() == 1);
  for (Backend b : available_backends()) {
    if (b == Backend::scalar) continue;
    CHECK_THROWS_WITH(dispatch(only_scalar, b),
                      Catch::Contains("[test_op]") && Catch::Contains(std::string(backend_name(b))));
  }
}

TEST_CASE("automatic takes the best rung with a kernel at or below the machine's", "[dispatch]") {
  unsetenv("HALO_BACKEND");
  const KernelTable<Kernel> full{
      "full", {rung(Backend::scalar, &scalar_kernel), rung(Backend::avx2, &avx2_kernel), rung(Backend::avx512, &avx512_kernel)}};
  const KernelTable<Kernel> no_avx512{"partial", {rung(Backend::scalar, &scalar_kernel), rung(Backend::avx2, &avx2_kernel)}};
  const Backend best = resolve(Backend::automatic);
  const auto chosen = dispatch(full, Backend::automatic);
  CHECK(chosen.backend == best);
  CHECK(chosen.kernel() == (best == Backend::avx512 ? 3 : best == Backend::avx2 ? 2 : 1));
  const auto lower = dispatch(no_avx512, Backend::automatic);
  CHECK(lower.backend == (best == Backend::scalar ? Backend::scalar : Backend::avx2));
  setenv("HALO_BACKEND", "scalar", 1);
  CHECK(dispatch(full, Backend::automatic).backend == Backend::scalar);
  unsetenv("HALO_BACKEND");
}

TEST_CASE("the inventory lists the library's kernel tables", "[dispatch]") {
  // Use both areas so the static library links their registrations into this test.
  const float input[64] = {};
  Quantized4 q = quantize_4bit(input, Format::f32, {64}, Format::nf4);
  CHECK(q.packed.size() == 32);
  CHECK(lora::lora_scaling(16, 4, false) == 4.0);
  bool quantize = false, gemm = false;
  for (const auto& entry : kernel_inventory()) {
    if (entry.op == "quantize_4bit") quantize = entry.backends.size() >= 3;
    if (entry.op == "lora_tile_gemm") gemm = true;
  }
  CHECK(quantize);
  CHECK(gemm);
}
