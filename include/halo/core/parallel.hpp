// Fork-join over large arrays on one process-wide pool of threads.
//
// parallel_for splits [0, count) into contiguous chunks (multiples of `grain`),
// one per worker, and runs them on the pool with the caller taking the first
// chunk. The split depends only on count, grain and num_threads(), never on
// timing, so results that depend on it (none should) are reproducible.
// Small jobs, calls made from inside a pool task, and calls while another
// thread holds the pool run inline on the caller's thread. The pool is
// created on first use, grows to the largest thread count asked for, and is
// rebuilt in a child process after fork().
#pragma once

#include <cstdint>
#include <functional>

namespace halo {

// HALO_NUM_THREADS when set (>= 1), otherwise the hardware concurrency.
int num_threads();

// fn(begin, end) over disjoint chunks covering [0, count); chunk boundaries are
// multiples of `grain`. The first exception thrown by any chunk is rethrown on
// the caller after every chunk has finished.
void parallel_for(int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace halo
