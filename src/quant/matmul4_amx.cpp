// AMX-BF16 pieces of the 4-bit GEMMs for bfloat16 x: weight panels decoded to
// bfloat16 straight into tile layout, and a 32 x 32 tile product (4 accumulator
// tiles, 2 a and 2 b tiles). Compiled with the AVX-512 flags plus -mavx512bf16
// -mamx-tile -mamx-bf16; called only where the CPU and the OS allow AMX and the
// CPU has AVX512-BF16 (matmul4_special.cpp checks).
//
// Whole 64-element chunks are decoded in "chunk order" (see chunk_element in
// matmul4_special.hpp): 32 bytes broadcast to both halves of a zmm register,
// shifted per 16-bit lane and looked up with vpermw, two instructions per 32
// weights. A dot product does not care in which order k runs as long as both
// operands agree, so x is laid out in the same order; shapes whose rows do not
// start on a chunk (K % 64 != 0, blocks of 32) use natural order throughout.
// GCC 12 warns about the _mm512_undefined_* inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

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

// The block's 16 weights as bfloat16, twice (vpermw reads 5 index bits). vcvtne2ps2bf16
// rounds to nearest even and flushes subnormal results to zero, as the tile product
// treats subnormal inputs anyway.
__m512i table(const float* code, float absmax) {
  const __m512 weights = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(absmax));
  return (__m512i)_mm512_cvtne2ps_pbh(weights, weights);
}

// Weight bits of one element through the scalar reference (already rounded to bfloat16).
uint16_t scalar_weight(const Matmul4Weight& w, int64_t o, int64_t k) {
  const float value = matmul4_weight(w, o, k);
  uint32_t bits;
  __builtin_memcpy(&bits, &value, 4);
  return uint16_t(bits >> 16);
}

// Chunk c of row o (64 weights, one block) as two vectors in chunk order.
void decode_chunk(const Matmul4Weight& w, int64_t o, int64_t c, __m512i& first, __m512i& second) {
  const int64_t flat = o * w.in + 64 * c;
  const __m512i lookup = table(w.code, w.absmax[flat >> w.block_shift]);
  const __m512i bytes = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.packed + flat / 2)));
  const __m512i shift0 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m512i shift1 = _mm512_add_epi16(shift0, _mm512_set1_epi16(8));
  first = _mm512_permutexvar_epi16(_mm512_srlv_epi16(bytes, shift0), lookup);
  second = _mm512_permutexvar_epi16(_mm512_srlv_epi16(bytes, shift1), lookup);
}

// W[o, k0:k1] in natural order: element k goes to dst[(k - k0) / 32 * piece_stride + (k - k0) % 32].
void decode_natural(const Matmul4Weight& w, int64_t o, int64_t k0, int64_t k1, uint16_t* dst, int64_t piece_stride) {
  const auto slot = [&](int64_t k) { return dst + (k - k0) / 32 * piece_stride + (k - k0) % 32; };
  const int64_t base = o * w.in;
  int64_t k = k0;
  for (; k < k1 && (base + k) % 32 != 0; ++k) *slot(k) = scalar_weight(w, o, k);
  int64_t block = -1;
  __m512i lookup = _mm512_setzero_si512();
  for (; k + 32 <= k1; k += 32) {
    const int64_t i = base + k;
    if (i >> w.block_shift != block) {
      block = i >> w.block_shift;
      lookup = table(w.code, w.absmax[block]);
    }
    const __m256i wide = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.packed + i / 2)));
    const __m256i order = _mm256_or_si256(_mm256_srli_epi16(wide, 4),
                                          _mm256_slli_epi16(_mm256_and_si256(wide, _mm256_set1_epi16(0x0f)), 8));
    const __m512i weights = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(order), lookup);
    if ((k - k0) % 32 == 0) {
      _mm512_storeu_si512(slot(k), weights);
    } else {  // the row starts mid-piece (K % 32 != 0): scatter through a buffer
      alignas(64) uint16_t piece[32];
      _mm512_store_si512(piece, weights);
      for (int j = 0; j < 32; ++j) *slot(k + j) = piece[j];
    }
  }
  for (; k < k1; ++k) *slot(k) = scalar_weight(w, o, k);
}

// 16 x 16 32-bit words: word j of r[i] goes to word i of r[j].
void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// 16 floats to bfloat16 bits exactly as float_to_bf16 (round to nearest even, NaN as 0x7fc0;
// unlike vcvtneps2bf16, subnormals are kept).
__m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(rounded);
}

// The chunk-order permutation of a 64-element chunk both ways, as vpermt2w indices: position
// 32v + q holds element chunk_element(v, q), and element e sits at position[e].
struct ChunkOrder {
  alignas(64) uint16_t element[64];
  alignas(64) uint16_t position[64];
};

const ChunkOrder& chunk_order_tables() {
  static const ChunkOrder tables = [] {
    ChunkOrder t{};
    for (int v = 0; v < 2; ++v)
      for (int q = 0; q < 32; ++q) {
        const int e = chunk_element(v, q);
        t.element[32 * v + q] = uint16_t(e);
        t.position[e] = uint16_t(32 * v + q);
      }
    return t;
  }();
  return tables;
}

void zero_words(uint16_t* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = 0;
}

template <int ATiles, int BTiles>
void product(const uint16_t* a, int64_t a_step, int64_t a_next, const uint32_t* b, int64_t b_step, int64_t b_next,
             int64_t steps, float* c, int64_t c_stride, int64_t c_row, int64_t c_col, bool accumulate) {
  const int64_t stride = c_stride * 4;
  if (accumulate) {
    _tile_loadd(0, c, stride);
    if constexpr (BTiles > 1) _tile_loadd(1, c + c_col, stride);
    if constexpr (ATiles > 1) _tile_loadd(2, c + c_row, stride);
    if constexpr (ATiles > 1 && BTiles > 1) _tile_loadd(3, c + c_row + c_col, stride);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* as = a + s * a_step;
    const uint32_t* bs = b + s * b_step;
    _tile_loadd(4, as, 64);
    if constexpr (ATiles > 1) _tile_loadd(5, as + a_next, 64);
    _tile_loadd(6, bs, 64);
    if constexpr (BTiles > 1) _tile_loadd(7, bs + b_next, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (BTiles > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (ATiles > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (ATiles > 1 && BTiles > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, stride);
  if constexpr (BTiles > 1) _tile_stored(1, c + c_col, stride);
  if constexpr (ATiles > 1) _tile_stored(2, c + c_row, stride);
  if constexpr (ATiles > 1 && BTiles > 1) _tile_stored(3, c + c_row + c_col, stride);
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

void decode_rows(const Matmul4Weight& w, int64_t n0, int64_t n1, int64_t s0, int64_t steps, bool chunk_order,
                 uint16_t* panel) {
  const int64_t k0 = 32 * s0, k1 = 32 * (s0 + steps);
  for (int64_t r = 0; r < 32; ++r) {
    uint16_t* dst = panel + r * 32;
    const int64_t o = n0 + r;
    int64_t filled = k0;
    if (o < n1 && chunk_order) {
      for (int64_t c = s0 / 2; c < (s0 + steps) / 2; ++c) {
        __m512i first, second;
        decode_chunk(w, o, c, first, second);
        _mm512_storeu_si512(dst + (2 * c - s0) * 1024, first);
        _mm512_storeu_si512(dst + (2 * c + 1 - s0) * 1024, second);
      }
      filled = k1;
    } else if (o < n1) {
      filled = k1 < w.in ? k1 : w.in;
      if (filled > k0) decode_natural(w, o, k0, filled, dst, 1024);
      if (filled < k0) filled = k0;
    }
    for (int64_t k = filled; k < k1; ++k) dst[(k - k0) / 32 * 1024 + (k - k0) % 32] = 0;
  }
}

void decode_pairs(const Matmul4Weight& w, int64_t k0, int64_t o0, int64_t steps, bool chunk_order, uint32_t* panel) {
  alignas(64) static const uint16_t kInterleave[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                       8,  40, 9,  41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  // Word j of the result is (a[j], b[j]) of two rows: the low 16 bits hold row o.
  const __m512i low_half = _mm512_load_si512(kInterleave);
  const __m512i high_half = _mm512_add_epi16(low_half, _mm512_set1_epi16(16));
  const int64_t column_block = steps * 256;
  const int64_t k1 = k0 + 64 < w.in ? k0 + 64 : w.in;
  alignas(64) uint16_t first[64], second[64];
  for (int64_t p = 0; p < steps * 16; ++p) {
    const int64_t o = o0 + 2 * p;
    __m512i rows[2][2];  // [row o / o+1][32-column half]
    if (chunk_order) {
      for (int j = 0; j < 2; ++j) {
        if (o + j < w.out)
          decode_chunk(w, o + j, k0 / 64, rows[j][0], rows[j][1]);
        else
          rows[j][0] = rows[j][1] = _mm512_setzero_si512();
      }
    } else {
      zero_words(first, 64);
      zero_words(second, 64);
      if (o < w.out && k1 > k0) decode_natural(w, o, k0, k1, first, 32);
      if (o + 1 < w.out && k1 > k0) decode_natural(w, o + 1, k0, k1, second, 32);
      for (int h = 0; h < 2; ++h) {
        rows[0][h] = _mm512_load_si512(first + 32 * h);
        rows[1][h] = _mm512_load_si512(second + 32 * h);
      }
    }
    for (int h = 0; h < 2; ++h) {
      _mm512_storeu_si512(panel + (2 * h) * column_block + p * 16,
                          _mm512_permutex2var_epi16(rows[0][h], low_half, rows[1][h]));
      _mm512_storeu_si512(panel + (2 * h + 1) * column_block + p * 16,
                          _mm512_permutex2var_epi16(rows[0][h], high_half, rows[1][h]));
    }
  }
}

void pair_tile(const uint16_t* x, int64_t rows, int64_t in, int64_t block, int64_t s, bool chunk_order, uint32_t* dst) {
  const __m512i index = _mm512_load_si512(chunk_order_tables().element + 32 * (s % 2));
  const int64_t k0 = chunk_order ? (s / 2) * 64 : s * 32;
  const int64_t width = chunk_order ? 64 : std::min<int64_t>(32, in - k0);
  __m512i r[16];
  for (int i = 0; i < 16; ++i) {
    const int64_t m = 16 * block + i;
    if (m >= rows) {
      r[i] = _mm512_setzero_si512();
    } else if (chunk_order) {
      const uint16_t* row = x + m * in + k0;
      r[i] = _mm512_permutex2var_epi16(_mm512_loadu_si512(row), index, _mm512_loadu_si512(row + 32));
    } else {
      r[i] = _mm512_maskz_loadu_epi16(uint32_t((uint64_t(1) << width) - 1), x + m * in + k0);
    }
  }
  transpose16(r);
  for (int p = 0; p < 16; ++p) _mm512_storeu_si512(dst + p * 16, r[p]);
}

void store_rows(const float* c, int64_t blocks, int64_t block, int64_t rows, int64_t n0, int64_t n1,
                const uint16_t* bias, uint16_t* y, int64_t ldy) {
  const int64_t m_count = std::min<int64_t>(16, rows - 16 * block);
  for (int64_t t = 0; 16 * t < n1 - n0; ++t) {
    const int64_t n = n0 + 16 * t, width = std::min<int64_t>(16, n1 - n);
    const auto mask = __mmask16((uint32_t(1) << width) - 1);
    const float* tile = c + (t * blocks + block) * 256;
    __m512i r[16];
    for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(tile + j * 16);
    transpose16(r);
    __m512 add = _mm512_setzero_ps();
    if (bias != nullptr)  // bfloat16 bits << 16 are the float
      add = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bias + n)), 16));
    for (int64_t i = 0; i < m_count; ++i)
      _mm256_mask_storeu_epi16(y + (16 * block + i) * ldy + n, mask,
                               to_bf16(_mm512_add_ps(_mm512_castsi512_ps(r[i]), add)));
  }
}

void store_strip(const float* c, int64_t row_in_tile, bool chunk_order, int64_t count, uint16_t* y_row) {
  __m256i half[4];
  for (int u = 0; u < 4; ++u) half[u] = to_bf16(_mm512_loadu_ps(c + u * 256 + row_in_tile * 16));
  __m512i low = _mm512_inserti64x4(_mm512_castsi256_si512(half[0]), half[1], 1);
  __m512i high = _mm512_inserti64x4(_mm512_castsi256_si512(half[2]), half[3], 1);
  if (chunk_order) {
    const __m512i a = low;
    low = _mm512_permutex2var_epi16(a, _mm512_load_si512(chunk_order_tables().position), high);
    high = _mm512_permutex2var_epi16(a, _mm512_load_si512(chunk_order_tables().position + 32), high);
  }
  const auto mask = [](int64_t n) { return n >= 32 ? ~__mmask32(0) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1); };
  _mm512_mask_storeu_epi16(y_row, mask(count), low);
  _mm512_mask_storeu_epi16(y_row + 32, mask(count - 32), high);
}

void tile_product(const uint16_t* a, int64_t a_step, int64_t a_next, int a_tiles, const uint32_t* b, int64_t b_step,
                  int64_t b_next, int b_tiles, int64_t steps, float* c, int64_t c_stride, int64_t c_next_row,
                  int64_t c_next_col, bool accumulate) {
  if (a_tiles > 1 && b_tiles > 1)
    product<2, 2>(a, a_step, a_next, b, b_step, b_next, steps, c, c_stride, c_next_row, c_next_col, accumulate);
  else if (a_tiles > 1)
    product<2, 1>(a, a_step, a_next, b, b_step, b_next, steps, c, c_stride, c_next_row, c_next_col, accumulate);
  else if (b_tiles > 1)
    product<1, 2>(a, a_step, a_next, b, b_step, b_next, steps, c, c_stride, c_next_row, c_next_col, accumulate);
  else
    product<1, 1>(a, a_step, a_next, b, b_step, b_next, steps, c, c_stride, c_next_row, c_next_col, accumulate);
}

}  // namespace halo::kernels::amx
