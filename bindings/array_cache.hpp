// Output arrays that reuse memory. A fresh array of many MiB costs a page fault and
// a kernel zeroing per 4 KiB page on its first write, which made dequantize_4bit into
// a new array about 1.5x slower than into `out=`. Arrays of at least 1 MiB made here
// take their memory from a small cache of blocks that earlier arrays gave back when
// Python freed them (torch tensors made with torch.from_numpy keep the array alive).
// At most HALO_ARRAY_CACHE_MIB MiB (default 512; 0 turns the cache off) stay cached.
#pragma once

#include <cstdint>

#include "bindings/registry.hpp"

namespace halo::bindings {

// A new 1-D array like new_array(format, count), its contents unspecified.
py::array cached_array(Format format, int64_t count);

// (blocks cached, bytes cached): for tests.
std::pair<int64_t, int64_t> array_cache_state();

}  // namespace halo::bindings
