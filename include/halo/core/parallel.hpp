// A minimal fork-join helper for kernels over large arrays: splits [0, count)
// into contiguous chunks (multiples of `grain`) run on up to num_threads()
// threads. Small jobs run inline on the caller's thread.
#pragma once

#include <cstdint>
#include <functional>

namespace halo {

// HALO_NUM_THREADS when set (>= 1), otherwise the hardware concurrency.
int num_threads();

// fn(begin, end) over disjoint chunks covering [0, count); chunk boundaries are
// multiples of `grain`. Exceptions from any chunk are rethrown on the caller.
void parallel_for(int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace halo
