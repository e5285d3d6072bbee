#include "halo/lora/merge.hpp"

#include <Eigen/Core>

#include "halo/core/error.hpp"

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

}  // namespace halo::lora
