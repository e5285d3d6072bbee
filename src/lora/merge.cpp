#include "halo/lora/merge.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <vector>

#include "halo/core/convert.hpp"
#include "halo/core/error.hpp"
#include "halo/core/parallel.hpp"

namespace halo::lora {
namespace {
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

void check(const char* function, int64_t out_features, int64_t in_features, int64_t rank) {
  require(out_features > 0 && in_features > 0, function, "weight shape must be positive, got [", out_features, ", ",
          in_features, "]");
  require(rank > 0, function, "rank must be positive, got ", rank);
}
}  // namespace

void delta_weight(float* delta, int64_t out_features, int64_t in_features, const float* lora_a, const float* lora_b,
                  int64_t rank, float scaling, bool fan_in_fan_out) {
  check("delta_weight", out_features, in_features, rank);
  Eigen::Map<const RowMatrix> a(lora_a, rank, in_features);
  Eigen::Map<const RowMatrix> b(lora_b, out_features, rank);
  RowMatrix product = b * a;
  if (fan_in_fan_out) {
    Eigen::Map<RowMatrix> out(delta, in_features, out_features);
    out.noalias() = product.transpose() * scaling;
  } else {
    Eigen::Map<RowMatrix> out(delta, out_features, in_features);
    out.noalias() = product * scaling;
  }
}

void merge_inplace(float* weight, int64_t out_features, int64_t in_features, const float* lora_a,
                   const float* lora_b, int64_t rank, float scaling, bool fan_in_fan_out, bool subtract) {
  check("merge_inplace", out_features, in_features, rank);
  RowMatrix delta(fan_in_fan_out ? in_features : out_features, fan_in_fan_out ? out_features : in_features);
  delta_weight(delta.data(), out_features, in_features, lora_a, lora_b, rank, scaling, fan_in_fan_out);
  Eigen::Map<RowMatrix> w(weight, delta.rows(), delta.cols());
  if (subtract)
    w -= delta;
  else
    w += delta;
}

void merge_weight(const void* weight, Format dtype, void* out, int64_t out_features, int64_t in_features,
                  const float* lora_a, const float* lora_b, int64_t rank, float scaling, bool fan_in_fan_out,
                  bool subtract) {
  const char* fn = subtract ? "unmerge" : "merge";
  check(fn, out_features, in_features, rank);
  require<TypeMismatch>(is_kernel_float(dtype), fn, "weight dtype must be float32, float16 or bfloat16, got ",
                        format_name(dtype));
  const int64_t n = out_features * in_features;
  if (dtype == Format::f32) {
    if (out != weight) std::copy_n(static_cast<const float*>(weight), n, static_cast<float*>(out));
    merge_inplace(static_cast<float*>(out), out_features, in_features, lora_a, lora_b, rank, scaling, fan_in_fan_out,
                  subtract);
    return;
  }
  std::vector<float> delta(static_cast<size_t>(n));
  delta_weight(delta.data(), out_features, in_features, lora_a, lora_b, rank, scaling, fan_in_fan_out);
  const auto* src = static_cast<const uint16_t*>(weight);
  auto* dst = static_cast<uint16_t*>(out);
  parallel_for(n, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float w = load_as_float(src, dtype, i);
      float d = delta[i];
      uint16_t rounded_delta;
      store_from_float(&rounded_delta, dtype, 0, d);
      d = load_as_float(&rounded_delta, dtype, 0);
      store_from_float(dst, dtype, i, subtract ? w - d : w + d);
    }
  });
}

}  // namespace halo::lora
