// The CUDA backend: equal to the scalar reference where a device is present,
// over many sizes, every block size, every input and output dtype; a clear
// BackendUnavailable error where it is not.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "halo/core/error.hpp"
#include "halo/quant/block.hpp"
#include "halo/quant/quant4.hpp"

using namespace halo;

namespace {
std::vector<float> values_with_specials(int64_t n, unsigned seed) {
  std::vector<float> values(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  for (float& v : values) v = normal(rng);
  if (n > 70) {
    values[3] = NAN;
    values[40] = INFINITY;
    values[66] = -1e30f;
    for (int64_t i = n / 2; i < std::min(n, n / 2 + 64); ++i) values[i] = 0.0f;  // an all-zero block for small sizes
  }
  return values;
}
}  // namespace

TEST_CASE("CUDA 4-bit kernels equal the scalar reference, or say why they cannot run", "[cuda]") {
  if (!backend_available(Backend::cuda)) {
    const int64_t n = 1000;
    std::vector<float> values(n, 1.0f);
    std::vector<uint8_t> packed(packed_size(n));
    std::vector<float> absmax(num_blocks(n, 64));
    REQUIRE_THROWS_AS(
        quantize_4bit(values.data(), Format::f32, n, Format::nf4, 64, packed.data(), absmax.data(), Backend::cuda),
        BackendUnavailable);
    REQUIRE_THROWS_WITH(dequantize_4bit(packed.data(), absmax.data(), n, Format::nf4, 64, values.data(), Format::f32,
                                        Backend::cuda),
                        Catch::Contains("cuda"));
    REQUIRE_FALSE(backend_unavailable_reason(Backend::cuda).empty());
    return;
  }
  for (int64_t n : {int64_t(1), int64_t(31), int64_t(33), int64_t(63), int64_t(65), int64_t(4095), int64_t(4097),
                    int64_t(100003), int64_t((1 << 20) + 7)}) {
    const std::vector<float> values = values_with_specials(n, unsigned(n));
    for (int64_t blocksize = kBnb4MinBlock; blocksize <= kBnb4MaxBlock; blocksize *= 2)
      for (Format type : {Format::nf4, Format::fp4})
        for (Format dtype : {Format::f32, Format::f16, Format::bf16}) {
          INFO("n " << n << " blocksize " << blocksize << " " << format_name(type) << " " << format_name(dtype));
          std::vector<uint16_t> halves(n);
          for (int64_t i = 0; i < n; ++i) store_from_float(halves.data(), dtype, i, values[i]);
          const void* input = dtype == Format::f32 ? static_cast<const void*>(values.data()) : halves.data();
          std::vector<uint8_t> p_ref(packed_size(n)), p_gpu(packed_size(n));
          std::vector<float> a_ref(num_blocks(n, blocksize)), a_gpu(num_blocks(n, blocksize));
          quantize_4bit(input, dtype, n, type, blocksize, p_ref.data(), a_ref.data(), Backend::scalar);
          quantize_4bit(input, dtype, n, type, blocksize, p_gpu.data(), a_gpu.data(), Backend::cuda);
          REQUIRE(p_ref == p_gpu);
          REQUIRE(std::memcmp(a_ref.data(), a_gpu.data(), a_ref.size() * 4) == 0);
          for (Format out : {Format::f32, Format::f16, Format::bf16}) {
            const size_t bytes = size_t(n) * size_t(element_size(out));
            std::vector<char> d_ref(bytes), d_gpu(bytes);
            dequantize_4bit(p_ref.data(), a_ref.data(), n, type, blocksize, d_ref.data(), out, Backend::scalar);
            dequantize_4bit(p_ref.data(), a_ref.data(), n, type, blocksize, d_gpu.data(), out, Backend::cuda);
            REQUIRE(std::memcmp(d_ref.data(), d_gpu.data(), bytes) == 0);
          }
        }
  }
}
