// PyTorch-order float32 sum / mean (see include/halo/core/reduce.hpp).
//
// Every addition below is a single IEEE-754 binary32 addition in a fixed
// order; the "vector" accumulators are plain arrays whose lanes are added
// independently, which is exactly what a SIMD add does. The file must be
// compiled without -ffast-math / -fassociative-math (the default for GCC and
// Clang) and with SSE (not x87) float arithmetic, which is the x86-64 default.
#include "halo/core/reduce.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <vector>

#include "halo/core/error.hpp"

namespace halo {
namespace {

// Element count below which (and at which) torch reduces on one thread
// (at::internal::GRAIN_SIZE).
constexpr int64_t kGrainSize = 32768;

// Independent accumulators the row sum interleaves (torch's ILP factor).
constexpr int kIlp = 4;

// Levels of the cascade accumulator.
constexpr int kLevels = 4;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ceil(log2(x)), except that x <= 2 gives 1 (the variant torch uses to size
// the cascade levels).
int64_t ceil_log2_min1(int64_t x) {
  if (x <= 2) return 1;
  auto v = static_cast<uint64_t>(x - 1);
  int64_t floor_log2 = -1;
  while (v != 0) {
    v >>= 1;
    ++floor_log2;
  }
  return floor_log2 + 1;
}

// A float accumulator of W lanes; `+=` adds lane by lane.
template <int W>
struct Lanes {
  std::array<float, W> v{};

  Lanes& operator+=(const Lanes& o) {
    for (int l = 0; l < W; ++l) v[l] += o.v[l];
    return *this;
  }
};

// Scalar accumulator with the same interface.
struct Scalar {
  float v = 0.0f;

  Scalar& operator+=(const Scalar& o) {
    v += o.v;
    return *this;
  }
};

// Source of the items summed by the cascade: item i is `W` consecutive floats
// starting at base + i * W (W == 1 gives scalars).
template <typename Acc>
struct Items;

template <int W>
struct Items<Lanes<W>> {
  const float* base;
  Lanes<W> operator[](int64_t i) const {
    Lanes<W> x;
    const float* p = base + i * W;
    for (int l = 0; l < W; ++l) x.v[l] = p[l];
    return x;
  }
};

template <>
struct Items<Scalar> {
  const float* base;
  Scalar operator[](int64_t i) const { return Scalar{base[i]}; }
};

// Cascade sum of `rows` rows of kIlp items each (row r holds items
// r*kIlp .. r*kIlp + kIlp - 1), giving one running sum per column.
//
// Items are added into a level-0 accumulator; every `step` rows the level-0
// sums are pushed into level 1 (and level 0 restarts from zero); whenever the
// row count is a multiple of step^2 level 1 is pushed into level 2, and so on
// up to kLevels levels. Rows left over after the last full step go straight
// into level 0, and finally levels 1..kLevels-1 are added onto level 0 in
// increasing order.
template <typename Acc>
std::array<Acc, kIlp> cascade_columns(const Items<Acc>& items, int64_t rows) {
  const int64_t power = std::max<int64_t>(4, ceil_log2_min1(rows) / kLevels);
  const int64_t step = int64_t{1} << power;
  const int64_t step_mask = step - 1;

  std::array<std::array<Acc, kIlp>, kLevels> level{};

  int64_t r = 0;
  while (r + step <= rows) {
    for (int64_t s = 0; s < step; ++s, ++r) {
      for (int c = 0; c < kIlp; ++c) level[0][c] += items[r * kIlp + c];
    }
    for (int lv = 1; lv < kLevels; ++lv) {
      for (int c = 0; c < kIlp; ++c) {
        level[lv][c] += level[lv - 1][c];
        level[lv - 1][c] = Acc{};
      }
      if ((r & (step_mask << (lv * power))) != 0) break;
    }
  }
  for (; r < rows; ++r) {
    for (int c = 0; c < kIlp; ++c) level[0][c] += items[r * kIlp + c];
  }
  for (int lv = 1; lv < kLevels; ++lv) {
    for (int c = 0; c < kIlp; ++c) level[0][c] += level[lv][c];
  }
  return level[0];
}

// Sum of `count` items: cascade over the first count/kIlp*kIlp of them in
// kIlp interleaved columns, the remaining items added onto column 0 in order,
// then columns 1..kIlp-1 added onto column 0 in order.
template <typename Acc>
Acc cascade_row(const Items<Acc>& items, int64_t count) {
  const int64_t rows = count / kIlp;
  std::array<Acc, kIlp> col = cascade_columns(items, rows);
  for (int64_t i = rows * kIlp; i < count; ++i) col[0] += items[i];
  for (int c = 1; c < kIlp; ++c) col[0] += col[c];
  return col[0];
}

// torch's sum of one contiguous float row, as the reduction loop computes it
// before adding it to the (zero-initialised) output.
template <int W>
float contiguous_row_sum(const float* x, int64_t n) {
  if (n < W) {
    // Too short for one vector: scalar cascade over the elements.
    return cascade_row(Items<Scalar>{x}, n).v;
  }
  // Vector cascade over the n / W full vectors, then the scalar tail summed
  // left to right from zero, then the W lanes added onto it left to right.
  const int64_t nvec = n / W;
  const Lanes<W> lanes = cascade_row(Items<Lanes<W>>{x}, nvec);
  float total = 0.0f;
  for (int64_t i = nvec * W; i < n; ++i) total += x[i];
  for (int l = 0; l < W; ++l) total += lanes.v[l];
  return total;
}

template <int W>
float sum_impl(const float* data, int64_t n, int num_threads) {
  const int64_t threads = std::max(num_threads, 1);

  // Single-threaded path: output (0) += row sum.
  if (n < kGrainSize || threads == 1) {
    float out = 0.0f;
    out += contiguous_row_sum<W>(data, n);
    return out;
  }

  // Two-pass reduction: one zero-initialised slot per thread.
  std::vector<float> slot(static_cast<std::size_t>(threads), 0.0f);
  if (n <= kGrainSize) {
    // parallel_for does not go parallel when the range fits in one grain;
    // everything lands in slot 0.
    slot[0] += contiguous_row_sum<W>(data, n);
  } else {
    // OpenMP parallel_for: the team of `threads` threads splits [0, n) into
    // equal chunks, using no more chunks than there are grains.
    const int64_t used = std::min(threads, ceil_div(n, kGrainSize));
    const int64_t chunk = ceil_div(n, used);
    for (int64_t t = 0; t < threads; ++t) {
      const int64_t begin = t * chunk;
      if (begin >= n) break;
      const int64_t end = std::min(n, begin + chunk);
      slot[static_cast<std::size_t>(t)] += contiguous_row_sum<W>(data + begin, end - begin);
    }
  }

  // Second pass: the slots are reduced by the same kernel into the output (0).
  float out = 0.0f;
  out += contiguous_row_sum<W>(slot.data(), threads);
  return out;
}

}  // namespace

float torch_sum_f32_width(const float* data, int64_t n, int num_threads, int vec_width) {
  require(n >= 0, "halo::torch_sum_f32", "n must be >= 0, got ", n);
  require(n == 0 || data != nullptr, "halo::torch_sum_f32", "data is null for n = ", n);
  switch (vec_width) {
    case 4:
      return sum_impl<4>(data, n, num_threads);
    case 8:
      return sum_impl<8>(data, n, num_threads);
    case 16:
      return sum_impl<16>(data, n, num_threads);
    default:
      fail("halo::torch_sum_f32_width", "vec_width must be 4, 8 or 16, got ", vec_width);
  }
}

float torch_sum_f32(const float* data, int64_t n, int num_threads) {
  return torch_sum_f32_width(data, n, num_threads, kTorchSumVecWidth);
}

float torch_mean_f32(const float* data, int64_t n, int num_threads) {
  const float sum = torch_sum_f32(data, n, num_threads);
  // ATen's CPU mean: sum_out(...).div_(numel); the integer divisor is
  // converted to float and a true float32 division is done.
  return sum / static_cast<float>(n);
}

}  // namespace halo
