// The CUDA backend: equal to the scalar reference where a device is present,
// a clear BackendUnavailable error where it is not.
#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "halo/core/error.hpp"
#include "halo/quant/block.hpp"
#include "halo/quant/quant4.hpp"

using namespace halo;

TEST_CASE("CUDA 4-bit kernels equal the scalar reference, or say why they cannot run", "[cuda]") {
  const int64_t n = 64 * 1000 + 33;
  std::vector<float> values(n);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (float& v : values) v = normal(rng);
  std::vector<uint8_t> p_ref(packed_size(n)), p_gpu(packed_size(n));
  std::vector<float> a_ref(num_blocks(n, 64)), a_gpu(num_blocks(n, 64));
  quantize_4bit(values.data(), Format::f32, n, Format::nf4, 64, p_ref.data(), a_ref.data(), Backend::scalar);
  if (!backend_available(Backend::cuda)) {
    REQUIRE_THROWS_AS(
        quantize_4bit(values.data(), Format::f32, n, Format::nf4, 64, p_gpu.data(), a_gpu.data(), Backend::cuda),
        BackendUnavailable);
    REQUIRE_FALSE(backend_unavailable_reason(Backend::cuda).empty());
    return;
  }
  for (Format type : {Format::nf4, Format::fp4})
    for (Format dtype : {Format::f32, Format::f16, Format::bf16}) {
      std::vector<uint16_t> halves(n);
      for (int64_t i = 0; i < n; ++i) halves[i] = dtype == Format::f16 ? float_to_f16(values[i]) : float_to_bf16(values[i]);
      const void* input = dtype == Format::f32 ? static_cast<const void*>(values.data()) : halves.data();
      quantize_4bit(input, dtype, n, type, 64, p_ref.data(), a_ref.data(), Backend::scalar);
      quantize_4bit(input, dtype, n, type, 64, p_gpu.data(), a_gpu.data(), Backend::cuda);
      REQUIRE(p_ref == p_gpu);
      REQUIRE(a_ref == a_gpu);
      std::vector<float> d_ref(n), d_gpu(n);
      dequantize_4bit(p_ref.data(), a_ref.data(), n, type, 64, d_ref.data(), Format::f32, Backend::scalar);
      dequantize_4bit(p_ref.data(), a_ref.data(), n, type, 64, d_gpu.data(), Format::f32, Backend::cuda);
      REQUIRE(d_ref == d_gpu);
    }
}
