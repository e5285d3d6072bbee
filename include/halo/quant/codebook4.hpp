// What a 4-bit kernel needs to know about a bitsandbytes 4-bit format (NF4 or
// FP4), derived once from the code book in the format table: the decision
// thresholds and the code of each rank. Kernels are written once against it.
//
// Thresholds are the float32 midpoints between neighbouring values in
// ascending order; a value goes to the higher bucket only when it is strictly
// greater than the threshold (an exact tie goes low), and NaN goes to the top
// bucket, as bitsandbytes' torch.bucketize does.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

#include "halo/core/format.hpp"

namespace halo {

struct Codebook4 {
  Format format;
  std::array<float, 16> code;            // value of each 4-bit code
  std::array<float, 15> thresholds;      // ascending, between values of consecutive ranks
  std::array<uint8_t, 16> code_of_rank;  // bucket (rank in ascending order) -> 4-bit code
  bool identity_order;                   // code_of_rank[r] == r (NF4): kernels skip the permutation
};

namespace detail {
constexpr std::array<float, 16> sorted_code(const std::array<float, 16>& code, const std::array<uint8_t, 16>& order) {
  std::array<float, 16> out{};
  for (int r = 0; r < 16; ++r) out[r] = code[order[r]];
  return out;
}
constexpr std::array<float, 15> midpoints(const std::array<float, 16>& sorted) {
  std::array<float, 15> out{};
  for (int i = 0; i < 15; ++i) out[i] = (sorted[i] + sorted[i + 1]) / 2.0f;
  return out;
}
constexpr Codebook4 make_codebook4(Format format, const std::array<float, 16>& code,
                                   const std::array<uint8_t, 16>& order) {
  bool identity = true;
  for (int r = 0; r < 16; ++r) identity = identity && order[r] == r;
  return {format, code, midpoints(sorted_code(code, order)), order, identity};
}
inline constexpr std::array<uint8_t, 16> kIdentityOrder = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
}  // namespace detail

inline constexpr Codebook4 kNF4 = detail::make_codebook4(Format::nf4, kNF4Code, detail::kIdentityOrder);
inline constexpr Codebook4 kFP4 = detail::make_codebook4(Format::fp4, kFP4Code, kFP4CodeOfRank);

// The code book of a bnb 4-bit format; InvalidArgument for any other format
// (a new 4-bit row must add its code book here, never fall through to another).
const Codebook4& codebook4(Format format);

}  // namespace halo
