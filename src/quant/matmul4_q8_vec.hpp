// The float32 side of the int8-activation kernels (matmul4_q8_simd.hpp) per vector width:
// Ymm for the AVX2 and AVX-VNNI entries, Zmm for the AVX-512 ones. Included only by their
// ISA translation units, after <immintrin.h>, with HALO_Q8_YMM or HALO_Q8_ZMM defined.
#pragma once

#include <cstddef>
#include <cstdint>

namespace halo::kernels {
namespace {

#if defined(HALO_Q8_YMM)
struct Ymm {
  static constexpr int kLanes = 8;
  using F = __m256;
  using I = __m256i;
  static F zero() { return _mm256_setzero_ps(); }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static F load_scale(const std::byte* p) { return _mm256_loadu_ps(reinterpret_cast<const float*>(p)); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static float sum(F v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
  }
  static void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p + 1024), _MM_HINT_T0); }
  static I load_i(const std::byte* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  // A chunk's 32 weight bytes -> its low nibbles and its high nibbles, each as 32 bytes.
  static void nibbles(const uint8_t* bytes, I& low, I& high) {
    const I chunk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
    const I mask = _mm256_set1_epi8(0x0f);
    low = _mm256_and_si256(chunk, mask);
    high = _mm256_and_si256(_mm256_srli_epi16(chunk, 4), mask);
  }
  static I broadcast16(__m128i v) { return _mm256_broadcastsi128_si256(v); }
  // Independent accumulators per (row of x, row of W), and rows of W decoded together.
  static constexpr int group(int rows) { return rows <= 2 ? 2 : 1; }
  static constexpr int chains(int rows, int group) { return rows * group <= 2 ? 2 : 1; }
  static constexpr int kMaxRows = 8;
};
#endif

#if defined(HALO_Q8_ZMM)
struct Zmm {
  static constexpr int kLanes = 16;
  using F = __m512;
  using I = __m512i;
  static F zero() { return _mm512_setzero_ps(); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F load_scale(const std::byte* p) { return _mm512_loadu_ps(reinterpret_cast<const float*>(p)); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
  static void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p + 1024), _MM_HINT_T0); }
  static I load_i(const std::byte* p) { return _mm512_loadu_si512(p); }
  // A chunk's 32 weight bytes -> 64 nibbles: the low ones in bytes 0-31, the high ones in 32-63.
  static I nibbles(const uint8_t* bytes) {
    const I both = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
    const I shift = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
    return _mm512_and_si512(_mm512_srlv_epi32(both, shift), _mm512_set1_epi8(0x0f));
  }
  static I broadcast16(__m128i v) { return _mm512_broadcast_i32x4(v); }
  static constexpr int group(int rows) { return rows <= 2 ? 2 : 1; }
  static constexpr int chains(int rows, int group) { return rows * group <= 2 ? 2 : 1; }
  static constexpr int kMaxRows = 8;
};
#endif

}  // namespace
}  // namespace halo::kernels
