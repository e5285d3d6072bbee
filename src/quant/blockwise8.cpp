// 8-bit blockwise quantization with a 256-entry code book, and the double
// quantization of 4-bit absmax built on it. Small data (one value per 4-bit
// block), so scalar code is enough.
#include <cmath>
#include <mutex>
#include <unordered_map>

#include "halo/core/error.hpp"
#include "halo/core/reduce.hpp"
#include "halo/quant/quant4.hpp"

namespace halo {
namespace {

constexpr int kLutSize = 1 << 16;

// lut[j] = index of the code nearest to u_j = 2j/65535 - 1, found as the number
// of midpoints below u_j (a tie stays low), as bitsandbytes builds it.
std::vector<uint8_t> build_lut(const float* code) {
  float mid[255];
  for (int i = 0; i < 255; ++i) mid[i] = (code[i] + code[i + 1]) * 0.5f;
  std::vector<uint8_t> lut(kLutSize);
  int index = 0;
  for (int j = 0; j < kLutSize; ++j) {
    const float jf = float(j);
    const float u = (jf + jf) / 65535.0f - 1.0f;
    while (index < 255 && u > mid[index]) ++index;
    lut[j] = uint8_t(index);
  }
  return lut;
}

const std::vector<uint8_t>& lut_for(const float* code) {
  static std::mutex guard;
  static std::unordered_map<std::string, std::vector<uint8_t>> cache;
  std::string key(reinterpret_cast<const char*>(code), 256 * sizeof(float));
  std::lock_guard lock(guard);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(std::move(key), build_lut(code)).first;
  return it->second;
}

}  // namespace

void quantize_blockwise_8bit(const float* input, int64_t n, int64_t blocksize, const float* code256, uint8_t* codes,
                             float* absmax) {
  require(n > 0, "quantize_blockwise_8bit", "the tensor is empty (n = ", n, ")");
  require(blocksize > 0, "quantize_blockwise_8bit", "blocksize must be positive, got ", blocksize);
  const std::vector<uint8_t>& lut = lut_for(code256);
  for (int64_t begin = 0, block = 0; begin < n; begin += blocksize, ++block) {
    const int64_t end = std::min(n, begin + blocksize);
    float found = -INFINITY;
    for (int64_t i = begin; i < end; ++i) {
      const float magnitude = std::fabs(input[i]);
      found = found < magnitude ? magnitude : found;  // NaN never wins
    }
    found = found > 0.0f ? found : 0.0f;
    absmax[block] = found;
    if (found == 0.0f) {
      for (int64_t i = begin; i < end; ++i) codes[i] = 0;
      continue;
    }
    const float inverse = 1.0f / found;
    for (int64_t i = begin; i < end; ++i) {
      float v = input[i] * inverse;
      v = v < -1.0f ? -1.0f : (1.0f < v ? 1.0f : v);
      const float position = std::fma((v + 1.0f) * 0.5f, 65535.0f, 0.5f);
      // Out-of-range conversions (NaN) give INT_MIN on x86, whose low 16 bits are 0.
      const int32_t index = std::isnan(position) ? 0 : int32_t(position);
      codes[i] = lut[uint16_t(index)];
    }
  }
}

void dequantize_blockwise_8bit(const uint8_t* codes, const float* absmax, int64_t n, int64_t blocksize,
                               const float* code256, float* output) {
  require(blocksize > 0, "dequantize_blockwise_8bit", "blocksize must be positive, got ", blocksize);
  for (int64_t i = 0; i < n; ++i) output[i] = code256[codes[i]] * absmax[i / blocksize];
}

NestedAbsmax double_quantize(const float* absmax, int64_t count, int64_t nested_blocksize,
                             std::optional<float> offset, int mean_threads) {
  require(count > 0, "double_quantize", "no absmax values (count = ", count, ")");
  require(nested_blocksize > 0, "double_quantize", "nested blocksize must be positive, got ", nested_blocksize);
  require(offset || mean_threads >= 1, "double_quantize", "mean_threads must be >= 1, got ", mean_threads);
  NestedAbsmax out;
  out.blocksize = nested_blocksize;
  out.offset = offset ? *offset : torch_mean_f32(absmax, count, mean_threads);
  std::vector<float> centered(count);
  for (int64_t i = 0; i < count; ++i) centered[i] = absmax[i] - out.offset;
  out.codes.resize(count);
  out.absmax.resize(num_blocks(count, nested_blocksize));
  quantize_blockwise_8bit(centered.data(), count, nested_blocksize, kDynamicMapSigned.data(), out.codes.data(),
                          out.absmax.data());
  return out;
}

void double_dequantize(const NestedAbsmax& nested, float* absmax_out) {
  const int64_t count = int64_t(nested.codes.size());
  require(nested.blocksize > 0, "double_dequantize", "nested_blocksize must be positive, got ", nested.blocksize);
  require(int64_t(nested.absmax.size()) == num_blocks(count, nested.blocksize), "double_dequantize",
          "nested_absmax holds ", nested.absmax.size(), " values, expected ", num_blocks(count, nested.blocksize));
  dequantize_blockwise_8bit(nested.codes.data(), nested.absmax.data(), count, nested.blocksize,
                            kDynamicMapSigned.data(), absmax_out);
  for (int64_t i = 0; i < count; ++i) absmax_out[i] = absmax_out[i] + nested.offset;
}

}  // namespace halo
