// AMX-BF16 pieces of the 4-bit GEMMs for bfloat16 x: weight panels decoded to
// bfloat16 (the a operand as stored, or row pairs interleaved as the b operand
// wants them) and a 32 x 32 tile product (4 accumulator tiles, 2 a and 2 b tiles).
// Compiled with the AVX-512 flags plus -mavx512bf16 -mamx-tile -mamx-bf16; called
// only where the CPU and the OS allow AMX (matmul4_special.cpp checks).
// GCC 12 warns about the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <cstdint>

#include "src/quant/matmul4_bf16_table.hpp"
#include "src/quant/matmul4_reference.hpp"
#include "src/quant/matmul4_special.hpp"

namespace halo::kernels::amx {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Weight bits of one element through the scalar reference (already rounded to bfloat16).
uint16_t scalar_weight(const Matmul4Weight& w, int64_t o, int64_t k) {
  const float value = matmul4_weight(w, o, k);
  uint32_t bits;
  __builtin_memcpy(&bits, &value, 4);
  return uint16_t(bits >> 16);
}

// W[o, k0:k1] as bfloat16 into dst[0 : k1 - k0]: whole 32-element pieces of one block
// by table look-up, unaligned ends through the scalar reference.
void decode_row(const Matmul4Weight& w, int64_t o, int64_t k0, int64_t k1, uint16_t* dst) {
  const int64_t begin = o * w.in + k0, end = o * w.in + k1;
  int64_t i = begin;
  for (; i < end && (i % 32) != 0; ++i) dst[i - begin] = scalar_weight(w, o, i - o * w.in);
  int64_t block = -1;
  __m512i table = _mm512_setzero_si512();
  for (; i + 32 <= end; i += 32) {
    if (i / w.blocksize != block) {
      block = i / w.blocksize;
      table = bf16_table(w.code, w.absmax[block]);
    }
    const __m256i wide = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.packed + i / 2)));
    const __m256i order = _mm256_or_si256(_mm256_srli_epi16(wide, 4),
                                          _mm256_slli_epi16(_mm256_and_si256(wide, _mm256_set1_epi16(0x0f)), 8));
    _mm512_storeu_si512(dst + (i - begin), _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(order), table));
  }
  for (; i < end; ++i) dst[i - begin] = scalar_weight(w, o, i - o * w.in);
}

void zero(uint16_t* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = 0;
}

template <int ATiles, int BTiles>
void product(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t depth, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < depth; k += 32) {
    _tile_loadd(4, a + k, lda * 2);
    if constexpr (ATiles > 1) _tile_loadd(5, a + 16 * lda + k, lda * 2);
    _tile_loadd(6, b + (k / 2) * ldb, ldb * 4);
    if constexpr (BTiles > 1) _tile_loadd(7, b + (k / 2) * ldb + 16, ldb * 4);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (BTiles > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (ATiles > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (ATiles > 1 && BTiles > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 128);
  if constexpr (BTiles > 1) _tile_stored(1, c + 16, 128);
  if constexpr (ATiles > 1) _tile_stored(2, c + 16 * 32, 128);
  if constexpr (ATiles > 1 && BTiles > 1) _tile_stored(3, c + 16 * 32 + 16, 128);
}

}  // namespace

void configure() {
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  // Not _tile_loadconfig: GCC 12 declares its operand as 8 bytes, so it drops the
  // stores to the rest of the configuration as dead.
  __asm__ volatile("ldtilecfg %0" : : "m"(config));
}

void release() { _tile_release(); }

void decode_rows(const Matmul4Weight& w, int64_t n0, int64_t n1, int64_t depth, uint16_t* panel) {
  for (int64_t r = 0; r < 32; ++r) {
    uint16_t* dst = panel + r * depth;
    if (n0 + r >= n1) {
      zero(dst, depth);
      continue;
    }
    decode_row(w, n0 + r, 0, w.in, dst);
    zero(dst + w.in, depth - w.in);
  }
}

void decode_pairs(const Matmul4Weight& w, int64_t k0, int64_t pair_rows, uint32_t* panel) {
  alignas(64) uint16_t first[64], second[64];
  const int64_t k1 = k0 + 64 < w.in ? k0 + 64 : w.in;
  // Word j of the result is (first[j], second[j]): the low 16 bits hold row o.
  alignas(64) static const uint16_t kInterleave[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                       8,  40, 9,  41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low_half = _mm512_load_si512(kInterleave);
  const __m512i high_half = _mm512_add_epi16(low_half, _mm512_set1_epi16(16));
  for (int64_t p = 0; p < pair_rows; ++p) {
    const int64_t o = 2 * p;
    zero(first, 64);
    zero(second, 64);
    if (o < w.out) decode_row(w, o, k0, k1, first);
    if (o + 1 < w.out) decode_row(w, o + 1, k0, k1, second);
    uint32_t* dst = panel + p * 64;
    for (int half = 0; half < 2; ++half) {
      const __m512i a = _mm512_load_si512(first + 32 * half);
      const __m512i b = _mm512_load_si512(second + 32 * half);
      _mm512_storeu_si512(dst + 32 * half, _mm512_permutex2var_epi16(a, low_half, b));
      _mm512_storeu_si512(dst + 32 * half + 16, _mm512_permutex2var_epi16(a, high_half, b));
    }
  }
}

void tile_product(const uint16_t* a, int64_t lda, int a_tiles, const uint32_t* b, int64_t ldb, int b_tiles,
                  int64_t depth, float* c) {
  if (a_tiles > 1 && b_tiles > 1)
    product<2, 2>(a, lda, b, ldb, depth, c);
  else if (a_tiles > 1)
    product<2, 1>(a, lda, b, ldb, depth, c);
  else if (b_tiles > 1)
    product<1, 2>(a, lda, b, ldb, depth, c);
  else
    product<1, 1>(a, lda, b, ldb, depth, c);
}

}  // namespace halo::kernels::amx
