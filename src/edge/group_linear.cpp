// linear_4bit: a resident group's 4-bit matrix times the layer input, without ever holding
// the float matrix: one dequantized row (in L1) at a time, dotted with every input row.
#include <vector>

#include "group_linear_kernels.hpp"
#include "halo/backend/dispatch.hpp"
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

const KernelTable<Dot> kDot{"edge_linear4_dot",
                            {rung(Backend::scalar, dot_scalar), rung(Backend::avx2, kernels::dot_avx2),
                             rung(Backend::avx512, kernels::dot_avx512)}};
const KernelRegistration kRegDot(kDot);

}  // namespace

void linear_4bit(const float* x, int64_t rows, int64_t in, const uint8_t* packed, const float* absmax,
                 Format type, int64_t blocksize, int64_t out, float* y, Backend backend) {
  const char* fn = "linear_4bit";
  require(rows >= 0 && in >= 1 && out >= 1, fn, "bad shape: x [", rows, ", ", in, "], W [", out, ", ", in, "]");
  require(valid_bnb4_blocksize(blocksize), fn, "blocksize must be a power of two in 32..4096, got ", blocksize);
  require(packed != nullptr && absmax != nullptr && (rows == 0 || (x != nullptr && y != nullptr)), fn,
          "null pointer");
  require(resolve(backend) != Backend::cuda, fn, "works on host memory; backend 'cuda' is not accepted");
  const auto dot = dispatch(kDot, backend);  // its rung also dequantizes the rows
  require(valid_bnb4_blocksize(blocksize) && is_bnb4(type), fn, "W must be nf4 or fp4, got ", format_name(type));
  thread_local std::vector<float> row;
  row.resize(static_cast<size_t>(in));
  for (int64_t o = 0; o < out; ++o) {
    dequantize_4bit_range(packed, absmax, type, blocksize, o * in, (o + 1) * in, row.data(), dot.backend);
    for (int64_t r = 0; r < rows; ++r) y[r * out + o] = dot.kernel(x + r * in, row.data(), in);
  }
}

}  // namespace halo::edge
