// Scratch buffers for the 4-bit matmul, aligned to a cache line: AMX tile loads of
// rows that straddle two lines run 3-5x slower (measured), and so do AVX-512 loads.
// Plain code only.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace halo::kernels {

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t count) { return static_cast<T*>(::operator new(count * sizeof(T), kAlignment)); }
  void deallocate(T* pointer, size_t) { ::operator delete(pointer, kAlignment); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
};

template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace halo::kernels
