// The AVX-512 rung's bfloat16 paths (AVX512-BF16 GEMV, AMX GEMMs): CPU and OS
// checks, thresholds and the work split around the per-ISA pieces. Plain C++.
//
// HALO_DISABLE_AMX=1 / HALO_DISABLE_AVX512_BF16=1 (read on every call) turn a path
// off, so tests and benchmarks can compare it with the plain AVX-512 kernels.
#include "src/quant/matmul4_special.hpp"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "halo/backend/backend.hpp"
#include "halo/core/convert.hpp"
#include "halo/core/parallel.hpp"

namespace halo::kernels {
namespace {

// Rows of x from which the forward product runs on AMX instead of the decode GEMV.
constexpr int64_t kAmxForwardRows = 17;
constexpr int64_t kGemvRows = 16;

bool disabled(const char* variable) {
  const char* value = std::getenv(variable);
  return value != nullptr && *value != '\0' && std::strcmp(value, "0") != 0;
}

uint64_t xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

// Linux hands out the AMX register file only on request (arch_prctl, kernel >= 5.16).
bool request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

int64_t round_up(int64_t value, int64_t step) { return (value + step - 1) / step * step; }

void store_bf16_row(float value, uint16_t* out) { *out = float_to_bf16(value); }

// ---- AVX512-BF16 decode GEMV -----------------------------------------------------------------------

void bf16_gemv_forward(const uint16_t* x, int64_t rows, const Matmul4Weight& w, const uint16_t* bias, uint16_t* y) {
  std::vector<uint16_t> panel(size_t(rows * w.in));
  std::vector<float> y32(size_t(rows * w.out));
  bf16::gemv_pack(x, rows, w.in, panel.data());
  parallel_for(w.out, 16, [&](int64_t o0, int64_t o1) { bf16::gemv(w, panel.data(), rows, o0, o1, y32.data(), w.out); });
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < w.out; ++o) {
      float value = y32[size_t(r * w.out + o)];
      if (bias != nullptr) value += bf16_to_float(bias[o]);
      store_bf16_row(value, y + r * w.out + o);
    }
}

// ---- AMX forward: yᵀ = W xᵀ ------------------------------------------------------------------------

// x [rows, in] -> the b operand: pairs[(k/2) * ld + m] = (x[m, k], x[m, k+1]), zero padded.
std::vector<uint32_t> pair_columns(const uint16_t* x, int64_t rows, int64_t in, int64_t depth, int64_t ld) {
  std::vector<uint32_t> pairs(size_t(depth / 2 * ld), 0u);
  parallel_for(depth / 2, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t m = 0; m < rows; ++m) {
        const int64_t k = 2 * p;
        const uint32_t low = k < in ? x[m * in + k] : 0u;
        const uint32_t high = k + 1 < in ? x[m * in + k + 1] : 0u;
        pairs[size_t(p * ld + m)] = low | (high << 16);
      }
  });
  return pairs;
}

void amx_forward(const uint16_t* x, int64_t rows, const Matmul4Weight& w, const uint16_t* bias, uint16_t* y) {
  const int64_t depth = round_up(w.in, 32), ld = round_up(rows, 16);
  const std::vector<uint32_t> pairs = pair_columns(x, rows, w.in, depth, ld);
  parallel_for(w.out, 32, [&](int64_t n_begin, int64_t n_end) {
    std::vector<uint16_t> panel(size_t(32 * depth));
    alignas(64) float c[32 * 32];
    amx::configure();
    for (int64_t n0 = n_begin; n0 < n_end; n0 += 32) {
      const int64_t n1 = std::min(n_end, n0 + 32);
      amx::decode_rows(w, n0, n1, depth, panel.data());
      for (int64_t m0 = 0; m0 < ld; m0 += 32) {
        const int b_tiles = ld - m0 >= 32 ? 2 : 1;
        amx::tile_product(panel.data(), depth, 2, pairs.data() + m0, ld, b_tiles, depth, c);
        const int64_t m1 = std::min(rows, m0 + 32);
        for (int64_t m = m0; m < m1; ++m)
          for (int64_t n = n0; n < n1; ++n) {
            float value = c[(n - n0) * 32 + (m - m0)];
            if (bias != nullptr) value += bf16_to_float(bias[n]);
            store_bf16_row(value, y + m * w.out + n);
          }
      }
    }
    amx::release();
  });
}

// ---- AMX transposed: y = x W --------------------------------------------------------------------------

void amx_transposed(const uint16_t* x, int64_t rows, const Matmul4Weight& w, uint16_t* y) {
  const int64_t depth = round_up(w.out, 32), padded_rows = round_up(rows, 16);
  // x padded to [padded_rows, depth] (the a operand).
  std::vector<uint16_t> a(size_t(padded_rows * depth), 0);
  for (int64_t m = 0; m < rows; ++m) std::memcpy(a.data() + m * depth, x + m * w.out, size_t(w.out) * 2);
  parallel_for(w.in, 64, [&](int64_t k_begin, int64_t k_end) {
    std::vector<uint32_t> panel(size_t(depth / 2 * 64));
    alignas(64) float c[32 * 32];
    amx::configure();
    for (int64_t k0 = k_begin; k0 < k_end; k0 += 64) {
      amx::decode_pairs(w, k0, depth / 2, panel.data());
      for (int64_t m0 = 0; m0 < padded_rows; m0 += 32) {
        const int a_tiles = padded_rows - m0 >= 32 ? 2 : 1;
        const int64_t m1 = std::min(rows, m0 + 32);
        for (int64_t half = 0; half < 2 && k0 + 32 * half < w.in; ++half) {
          amx::tile_product(a.data() + m0 * depth, depth, a_tiles, panel.data() + 32 * half, 64, 2, depth, c);
          const int64_t j0 = k0 + 32 * half, j1 = std::min(w.in, j0 + 32);
          for (int64_t m = m0; m < m1; ++m)
            for (int64_t k = j0; k < j1; ++k) store_bf16_row(c[(m - m0) * 32 + (k - j0)], y + m * w.in + k);
        }
      }
    }
    amx::release();
  });
}

bool bf16_gemv_fits(int64_t rows, int64_t in, int64_t blocksize) {
  return rows <= kGemvRows && in % 64 == 0 && blocksize >= 64;
}

}  // namespace

bool cpu_has_avx512_bf16() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!backend_available(Backend::avx512) || !__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    return (a & (1u << 5)) != 0;
  }();
  return has;
}

bool cpu_has_amx_bf16() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!backend_available(Backend::avx512) || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d & (1u << 24)) != 0, bf16 = (d & (1u << 22)) != 0;
    if (!tile || !bf16) return false;
    const uint64_t tile_state = (uint64_t(1) << 17) | (uint64_t(1) << 18);
    if ((xcr0() & tile_state) != tile_state) return false;
    return request_amx_permission();
  }();
  return has;
}

const char* special_variant(Format dtype, int64_t rows, int64_t in, int64_t /*out*/, int64_t blocksize,
                            bool transposed) {
  if (dtype != Format::bf16) return nullptr;
  const bool amx = cpu_has_amx_bf16() && !disabled("HALO_DISABLE_AMX");
  const bool dot = cpu_has_avx512_bf16() && !disabled("HALO_DISABLE_AVX512_BF16");
  if (transposed) return amx ? "avx512-amx" : nullptr;
  if (amx && rows >= kAmxForwardRows) return "avx512-amx";
  if (dot && bf16_gemv_fits(rows, in, blocksize)) return "avx512-bf16";
  return nullptr;
}

bool special_forward(const void* x, Format dtype, int64_t rows, const Matmul4Weight& w, const void* bias, void* y) {
  const char* variant = special_variant(dtype, rows, w.in, w.out, w.blocksize, false);
  if (variant == nullptr) return false;
  const auto* x16 = static_cast<const uint16_t*>(x);
  const auto* bias16 = static_cast<const uint16_t*>(bias);
  auto* y16 = static_cast<uint16_t*>(y);
  if (std::strcmp(variant, "avx512-amx") == 0)
    amx_forward(x16, rows, w, bias16, y16);
  else
    bf16_gemv_forward(x16, rows, w, bias16, y16);
  return true;
}

bool special_transposed(const void* x, Format dtype, int64_t rows, const Matmul4Weight& w, void* y) {
  if (special_variant(dtype, rows, w.in, w.out, w.blocksize, true) == nullptr) return false;
  amx_transposed(static_cast<const uint16_t*>(x), rows, w, static_cast<uint16_t*>(y));
  return true;
}

}  // namespace halo::kernels
