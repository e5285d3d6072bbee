#include "halo/core/parallel.hpp"

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <thread>
#include <vector>

namespace halo {

int num_threads() {
  if (const char* env = std::getenv("HALO_NUM_THREADS"); env && *env) {
    int value = std::atoi(env);
    if (value >= 1) return value;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

void parallel_for(int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (count <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t units = (count + grain - 1) / grain;
  const int64_t workers = std::min<int64_t>(num_threads(), units);
  if (workers <= 1) {
    fn(0, count);
    return;
  }
  const int64_t units_per_worker = (units + workers - 1) / workers;
  std::vector<std::exception_ptr> errors(workers);
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  auto run = [&](int64_t w) {
    const int64_t begin = std::min(count, w * units_per_worker * grain);
    const int64_t end = std::min(count, (w + 1) * units_per_worker * grain);
    if (begin >= end) return;
    try {
      fn(begin, end);
    } catch (...) {
      errors[w] = std::current_exception();
    }
  };
  for (int64_t w = 1; w < workers; ++w) threads.emplace_back(run, w);
  run(0);
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace halo
