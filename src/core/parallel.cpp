#include "halo/core/parallel.hpp"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
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
    bool sleeping;
    {
      std::lock_guard lock(mutex_);
      chunk_ = &chunk;
      next_ = 1;
      end_ = workers;
      pending_.store(workers - 1, std::memory_order_relaxed);
      generation_.store(generation_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
      sleeping = sleepers_ > 0;
    }
    if (sleeping) wake_.notify_all();  // spinning workers see the generation without a syscall
    inside_task_ = true;
    chunk(0);
    inside_task_ = false;
    // Chunks no worker has claimed yet run here: a sleeping worker wakes in tens of
    // microseconds on a VM, longer than a small matmul's whole half, so the caller
    // never waits for a thread that has not started.
    std::unique_lock lock(mutex_);
    drain(lock);
    if (pending_.load(std::memory_order_relaxed) != 0) {  // a worker is on its chunk: spin, then sleep
      lock.unlock();
      spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; });
      lock.lock();
      done_.wait(lock, [&] { return pending_.load(std::memory_order_relaxed) == 0; });
    }
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
    pending_.store(0);
    sleepers_ = 0;
  }

 private:
  void grow(int wanted) {
    // A new thread starts from the generation before the job about to be published: it
    // may first run after the bump, and must still see that job as new.
    const uint64_t before = generation_.load(std::memory_order_relaxed);
    while (int(threads_->size()) < wanted) threads_->emplace_back([this, before] { work(before); });
  }

  // A worker that finished a job spins on the generation for a short while before it
  // sleeps: a decode loop calls again within microseconds, and a sleeping thread takes
  // tens of microseconds to wake on a VM (more than a small layer's whole matmul).
  template <typename Ready>
  static bool spin_until(Ready ready) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 1;; ++i) {
      if (ready()) return true;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if (i % 64 == 0 && std::chrono::steady_clock::now() >= until) return false;
    }
  }

  [[noreturn]] void work(uint64_t seen) {
    for (;;) {
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      std::unique_lock lock(mutex_);
      if (generation_.load(std::memory_order_relaxed) == seen) {
        ++sleepers_;
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        --sleepers_;
      }
      seen = generation_.load(std::memory_order_relaxed);
      drain(lock);  // the caller may have claimed every chunk already
    }
  }

  // Runs the current job's chunks that no thread has claimed yet, on this thread; `lock`
  // (on mutex_) is held between chunks, released while one runs.
  void drain(std::unique_lock<std::mutex>& lock) {
    while (next_ < end_) {
      const int64_t w = next_++;
      const std::function<void(int64_t)>* chunk = chunk_;
      lock.unlock();
      inside_task_ = true;
      (*chunk)(w);
      inside_task_ = false;
      lock.lock();
      if (pending_.fetch_sub(1, std::memory_order_release) == 1) done_.notify_all();
    }
  }

  std::mutex owner_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::unique_ptr<std::vector<std::thread>> threads_ = std::make_unique<std::vector<std::thread>>();
  const std::function<void(int64_t)>* chunk_ = nullptr;
  int64_t next_ = 0, end_ = 0, sleepers_ = 0;
  std::atomic<int64_t> pending_{0};
  std::atomic<uint64_t> generation_{0};
  static constexpr std::chrono::microseconds kSpin{50};
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
