// linear_4bit: a resident group's 4-bit matrix times the layer input, without ever holding
// the float matrix: one dequantized row (in L1) at a time, dotted with every input row.
#include <vector>

#include "group_linear_kernels.hpp"
#include "halo/core/error.hpp"
#include "halo/edge/group_store.hpp"
#include "halo/quant/quant4.hpp"

namespace halo::edge {

namespace {

// The reference: float products summed in index order.
float dot_scalar(const float* a, const float* b, int64_t n) {
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) total += a[i] * b[i];
  return total;
}

using Dot = float (*)(const float*, const float*, int64_t);

Dot dot_for(Backend backend) {
  switch (backend) {
    case Backend::avx512: return kernels::dot_avx512;
    case Backend::avx2: return kernels::dot_avx2;
    default: return dot_scalar;
  }
}

}  // namespace

void linear_4bit(const float* x, int64_t rows, int64_t in, const uint8_t* packed, const float* absmax,
                 QuantType type, int64_t blocksize, int64_t out, float* y, Backend backend) {
  const char* fn = "linear_4bit";
  require(rows >= 0 && in >= 1 && out >= 1, fn, "bad shape: x [", rows, ", ", in, "], W [", out, ", ", in, "]");
  require(valid_blocksize(blocksize), fn, "blocksize must be a power of two in 32..4096, got ", blocksize);
  require(packed != nullptr && absmax != nullptr && (rows == 0 || (x != nullptr && y != nullptr)), fn,
          "null pointer");
  backend = resolve(backend);
  require(backend != Backend::cuda, fn, "works on host memory; backend 'cuda' is not accepted");
  const Dot dot = dot_for(backend);
  thread_local std::vector<float> row;
  row.resize(static_cast<size_t>(in));
  for (int64_t o = 0; o < out; ++o) {
    dequantize_4bit_range(packed, absmax, type, blocksize, o * in, (o + 1) * in, row.data(), backend);
    for (int64_t r = 0; r < rows; ++r) y[r * out + o] = dot(x + r * in, row.data(), in);
  }
}

}  // namespace halo::edge
