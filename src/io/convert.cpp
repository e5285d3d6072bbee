#include "halo/io/convert.hpp"

#include <cstring>

#include "halo/core/dtype.hpp"
#include "halo/core/error.hpp"
#include "halo/core/parallel.hpp"

namespace halo::io {
namespace {

// Chunks of 64 Ki elements: large enough that thread start-up is paid back.
constexpr int64_t kGrain = 1 << 16;

void check(const char* fn, StDType dtype, int64_t count) {
  require(is_float_dtype(dtype), fn, "dtype must be F32, F16, BF16 or F64, got ", dtype_name(dtype));
  require(count >= 0, fn, "count must be non-negative, got ", count);
}

}  // namespace

bool is_float_dtype(StDType dtype) {
  return dtype == StDType::F32 || dtype == StDType::F16 || dtype == StDType::BF16 || dtype == StDType::F64;
}

void convert_to_float32(const void* src, StDType dtype, int64_t count, float* dst) {
  check("convert_to_float32", dtype, count);
  parallel_for(count, kGrain, [&](int64_t begin, int64_t end) {
    switch (dtype) {
      case StDType::F32:
        std::memcpy(dst + begin, static_cast<const float*>(src) + begin, size_t(end - begin) * 4);
        break;
      case StDType::F16:
        for (int64_t i = begin; i < end; ++i) dst[i] = f16_to_float(static_cast<const uint16_t*>(src)[i]);
        break;
      case StDType::BF16:
        for (int64_t i = begin; i < end; ++i) dst[i] = bf16_to_float(static_cast<const uint16_t*>(src)[i]);
        break;
      default:
        for (int64_t i = begin; i < end; ++i) dst[i] = float(static_cast<const double*>(src)[i]);
        break;
    }
  });
}

void convert_from_float32(const float* src, int64_t count, StDType dtype, void* dst) {
  check("convert_from_float32", dtype, count);
  parallel_for(count, kGrain, [&](int64_t begin, int64_t end) {
    switch (dtype) {
      case StDType::F32:
        std::memcpy(static_cast<float*>(dst) + begin, src + begin, size_t(end - begin) * 4);
        break;
      case StDType::F16:
        for (int64_t i = begin; i < end; ++i) static_cast<uint16_t*>(dst)[i] = float_to_f16(src[i]);
        break;
      case StDType::BF16:
        for (int64_t i = begin; i < end; ++i) static_cast<uint16_t*>(dst)[i] = float_to_bf16(src[i]);
        break;
      default:
        for (int64_t i = begin; i < end; ++i) static_cast<double*>(dst)[i] = double(src[i]);
        break;
    }
  });
}

}  // namespace halo::io
