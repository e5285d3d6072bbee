#include "halo/core/parallel.hpp"

#include <pthread.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace halo {
namespace {

// One job at a time: `owner` is held by the thread that submitted it for the
// job's whole life, so workers never see two jobs interleaved.
class Pool {
 public:
  // Runs chunk(w) for w in [0, workers): w = 0 on the caller, the rest on pool threads.
  void run(int64_t workers, const std::function<void(int64_t)>& chunk) {
    std::unique_lock owner(owner_, std::try_to_lock);
    if (!owner.owns_lock() || inside_task_) {  // busy with another caller, or nested: inline
      for (int64_t w = 0; w < workers; ++w) chunk(w);
      return;
    }
    grow(int(workers - 1));
    {
      std::lock_guard lock(mutex_);
      chunk_ = &chunk;
      next_ = 1;
      end_ = workers;
      pending_ = workers - 1;
      ++generation_;
    }
    wake_.notify_all();
    inside_task_ = true;
    chunk(0);
    inside_task_ = false;
    std::unique_lock lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    chunk_ = nullptr;
  }

  // After fork() only the forking thread exists in the child: forget the parent's
  // threads (their objects are leaked on purpose; their locks may be held).
  void forget_after_fork() {
    new (&owner_) std::mutex();
    new (&mutex_) std::mutex();
    new (&wake_) std::condition_variable();
    new (&done_) std::condition_variable();
    threads_.release();
    threads_.reset(new std::vector<std::thread>());
    chunk_ = nullptr;
    pending_ = 0;
  }

 private:
  void grow(int wanted) {
    while (int(threads_->size()) < wanted) threads_->emplace_back([this] { work(); });
  }

  [[noreturn]] void work() {
    uint64_t seen = 0;
    std::unique_lock lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen && next_ < end_; });
      const int64_t w = next_++;
      if (next_ >= end_) seen = generation_;
      const std::function<void(int64_t)>* chunk = chunk_;
      lock.unlock();
      inside_task_ = true;
      (*chunk)(w);
      inside_task_ = false;
      lock.lock();
      if (--pending_ == 0) done_.notify_all();
    }
  }

  std::mutex owner_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::unique_ptr<std::vector<std::thread>> threads_ = std::make_unique<std::vector<std::thread>>();
  const std::function<void(int64_t)>* chunk_ = nullptr;
  int64_t next_ = 0, end_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  static thread_local bool inside_task_;
};

thread_local bool Pool::inside_task_ = false;

Pool& pool() {
  static Pool* instance = [] {
    auto* p = new Pool();  // never destroyed: threads may outlive static destruction order
    pthread_atfork(nullptr, nullptr, [] { pool().forget_after_fork(); });
    return p;
  }();
  return *instance;
}

}  // namespace

int num_threads() {
  if (const char* env = std::getenv("HALO_NUM_THREADS"); env && *env) {
    int value = std::atoi(env);
    if (value >= 1) return value;
  }
  // Counted once: glibc reads /sys/devices/system/cpu/online on every call (a few
  // microseconds, several times per small matmul).
  static const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
  return cores;
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
  pool().run(workers, [&](int64_t w) {
    const int64_t begin = std::min(count, w * units_per_worker * grain);
    const int64_t end = std::min(count, (w + 1) * units_per_worker * grain);
    if (begin >= end) return;
    try {
      fn(begin, end);
    } catch (...) {
      errors[w] = std::current_exception();
    }
  });
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace halo
