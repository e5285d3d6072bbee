// The AVX-512 rung's bfloat16 paths (AVX512-BF16 GEMV, AMX GEMMs): thresholds and the
// work split around the per-ISA pieces. Plain C++. Whether the CPU has the instructions
// is the registry's question (CpuFeature in halo/backend/dispatch.hpp).
#include "src/quant/matmul4_special.hpp"

#include "src/quant/matmul4_buffers.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "halo/core/convert.hpp"
#include "halo/core/parallel.hpp"

namespace halo::kernels {
namespace {

// Rows of x from which the forward product runs on AMX instead of the decode GEMV
// (measured on 4096 x 4096: the GEMV wins up to 4 rows, AMX from 5 or 8 on).
constexpr int64_t kAmxForwardRows = 5;
constexpr int64_t kGemvRows = 16;

int64_t round_up(int64_t value, int64_t step) { return (value + step - 1) / step * step; }

void store_bf16_row(float value, uint16_t* out) { *out = float_to_bf16(value); }

// ---- AVX512-BF16 decode GEMV -----------------------------------------------------------------------

void bf16_gemv_forward(const uint16_t* x, int64_t rows, const Matmul4Weight& w, const uint16_t* bias, uint16_t* y) {
  const int64_t pass_rows = std::min<int64_t>(rows, bf16::kMaxRows);
  AlignedVector<uint16_t> panel(size_t(pass_rows * w.in));
  AlignedVector<float> y32(size_t(rows * w.out));
  for (int64_t r0 = 0; r0 < rows; r0 += pass_rows) {  // W's codes are read once per pass
    const int64_t n = std::min(pass_rows, rows - r0);
    bf16::gemv_pack(x + r0 * w.in, n, w.in, panel.data());
    parallel_for(w.out, gemv_grain(w.out, w.in), [&](int64_t o0, int64_t o1) {
      bf16::gemv(w, panel.data(), n, o0, o1, y32.data() + r0 * w.out, w.out);
    });
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < w.out; ++o) {
      float value = y32[size_t(r * w.out + o)];
      if (bias != nullptr) value += bf16_to_float(bias[o]);
      store_bf16_row(value, y + r * w.out + o);
    }
}

// ---- AMX forward: yᵀ = W xᵀ ------------------------------------------------------------------------

// Blocking of both AMX products: kBlockSteps k-steps (512 of the inner dimension) of a
// block of 128 weight rows or columns (128 KiB of bfloat16 tiles, L2) are decoded once and
// used by every 32-row block of x; each block of x (2 x 16 KiB of tiles per k-block, L1)
// is used by all 4 weight panels of the block before the next one is loaded.
constexpr int64_t kBlockSteps = 16;
constexpr int64_t kBlockRows = 128;

// x [rows, in] -> b tiles: pairs[((m / 16) * steps * 16 + s * 16 + p) * 16 + m % 16] holds
// (x[m, k], x[m, k']) for the elements k, k' at positions 2p, 2p + 1 of k-step s.
AlignedVector<uint32_t> pair_tiles(const uint16_t* x, int64_t rows, int64_t in, int64_t steps, bool chunk_order) {
  const int64_t blocks = round_up(rows, 16) / 16;
  AlignedVector<uint32_t> pairs(size_t(blocks * steps * 256));
  parallel_for(blocks * steps, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      amx::pair_tile(x, rows, in, t / steps, t % steps, chunk_order, pairs.data() + t * 256);
  });
  return pairs;
}

bool chunk_order_fits(const Matmul4Weight& w, int64_t k_extent) { return k_extent % 64 == 0 && w.blocksize >= 64 && w.in % 64 == 0; }

void amx_forward(const uint16_t* x, int64_t rows, const Matmul4Weight& w, const uint16_t* bias, uint16_t* y) {
  const int64_t depth = round_up(w.in, 32), steps = depth / 32, blocks = round_up(rows, 16) / 16;
  const int64_t ld = blocks * 16;
  const bool chunk_order = chunk_order_fits(w, w.in);
  const AlignedVector<uint32_t> pairs = pair_tiles(x, rows, w.in, steps, chunk_order);
  parallel_for(w.out, 32, [&](int64_t n_begin, int64_t n_end) {
    AlignedVector<uint16_t> panel(size_t(kBlockRows / 32 * kBlockSteps * 1024));
    AlignedVector<float> c(size_t(kBlockRows * ld));  // kBlockRows / 16 x blocks tiles of 16 x 16
    amx::configure();
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kBlockRows) {
      const int64_t n1 = std::min(n_end, n0 + kBlockRows), panels = (n1 - n0 + 31) / 32;
      for (int64_t s0 = 0; s0 < steps; s0 += kBlockSteps) {
        const int64_t count = std::min(kBlockSteps, steps - s0);
        for (int64_t p = 0; p < panels; ++p)
          amx::decode_rows(w, n0 + 32 * p, std::min(n1, n0 + 32 * p + 32), s0, count, chunk_order,
                           panel.data() + p * kBlockSteps * 1024);
        for (int64_t b0 = 0; b0 < blocks; b0 += 2) {
          const int b_tiles = blocks - b0 >= 2 ? 2 : 1;
          for (int64_t p = 0; p < panels; ++p)
            amx::tile_product(panel.data() + p * kBlockSteps * 1024, 1024, 512, 2,
                              pairs.data() + (b0 * steps + s0) * 256, 256, steps * 256, b_tiles, count,
                              c.data() + (2 * p * blocks + b0) * 256, 16, blocks * 256, 256, s0 > 0);
        }
      }
      // c holds 16 x 16 tiles: tile (n / 16, m / 16) of the block, element (n % 16, m % 16).
      for (int64_t b = 0; b < blocks; ++b) amx::store_rows(c.data(), blocks, b, rows, n0, n1, bias, y, w.out);
    }
    amx::release();
  });
}

// ---- AMX transposed: y = x W --------------------------------------------------------------------------

void amx_transposed(const uint16_t* x, int64_t rows, const Matmul4Weight& w, uint16_t* y) {
  const int64_t depth = round_up(w.out, 32), steps = depth / 32, blocks = round_up(rows, 16) / 16;
  // x as a tiles: a[((m / 16) * steps + o / 32) * 512 + (m % 16) * 32 + o % 32], zero padded.
  AlignedVector<uint16_t> a(size_t(blocks * steps * 512), 0);
  parallel_for(rows, 16, [&](int64_t m_begin, int64_t m_end) {
    for (int64_t m = m_begin; m < m_end; ++m)
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t count = std::min<int64_t>(32, w.out - 32 * s);
        std::memcpy(a.data() + ((m / 16) * steps + s) * 512 + (m % 16) * 32, x + m * w.out + 32 * s, size_t(count) * 2);
      }
  });
  const bool chunk_order = chunk_order_fits(w, w.in);
  const int64_t strip = 64, strips = kBlockRows / strip;  // columns of W per decoded strip, strips per block
  const int64_t ld = kBlockRows, strip_words = 4 * kBlockSteps * 256, tiles_per_row = kBlockRows / 16;
  parallel_for(w.in, strip, [&](int64_t k_begin, int64_t k_end) {
    AlignedVector<uint32_t> panel(size_t(strips * strip_words));
    AlignedVector<float> c(size_t(blocks * 16 * ld));
    amx::configure();
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockRows) {
      const int64_t used = std::min(strips, (std::min(k_end, k0 + kBlockRows) - k0 + strip - 1) / strip);
      for (int64_t s0 = 0; s0 < steps; s0 += kBlockSteps) {
        const int64_t count = std::min(kBlockSteps, steps - s0);
        for (int64_t t = 0; t < used; ++t)
          amx::decode_pairs(w, k0 + strip * t, 32 * s0, count, chunk_order, panel.data() + t * strip_words);
        for (int64_t b0 = 0; b0 < blocks; b0 += 2) {
          const int a_tiles = blocks - b0 >= 2 ? 2 : 1;
          for (int64_t t = 0; t < used; ++t)
            for (int64_t h = 0; h < 2 && k0 + strip * t + 32 * h < w.in; ++h)
              amx::tile_product(a.data() + (b0 * steps + s0) * 512, 512, steps * 512, a_tiles,
                                panel.data() + t * strip_words + 2 * h * count * 256, 256, count * 256, 2, count,
                                c.data() + (b0 * tiles_per_row + (strip * t + 32 * h) / 16) * 256, 16,
                                tiles_per_row * 256, 256, s0 > 0);
        }
      }
      const int64_t limit = std::min(k_end, w.in);
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t t = 0; t < used; ++t)
          amx::store_strip(c.data() + ((m / 16) * tiles_per_row + 4 * t) * 256, m % 16, chunk_order,
                           limit - (k0 + strip * t), y + m * w.in + k0 + strip * t);
    }
    amx::release();
  });
}

}  // namespace

bool bf16_gemv_fits(Format dtype, int64_t rows, int64_t in, int64_t blocksize) {
  return dtype == Format::bf16 && rows <= kGemvRows && in % 64 == 0 && blocksize >= 64;
}

bool amx_forward_fits(Format dtype, int64_t rows) { return dtype == Format::bf16 && rows >= kAmxForwardRows; }

void run_bf16_gemv(const void* x, int64_t rows, const Matmul4Weight& w, const void* bias, void* y) {
  bf16_gemv_forward(static_cast<const uint16_t*>(x), rows, w, static_cast<const uint16_t*>(bias),
                    static_cast<uint16_t*>(y));
}

void run_amx_forward(const void* x, int64_t rows, const Matmul4Weight& w, const void* bias, void* y) {
  amx_forward(static_cast<const uint16_t*>(x), rows, w, static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(y));
}

void run_amx_transposed(const void* x, int64_t rows, const Matmul4Weight& w, void* y) {
  amx_transposed(static_cast<const uint16_t*>(x), rows, w, static_cast<uint16_t*>(y));
}

}  // namespace halo::kernels
