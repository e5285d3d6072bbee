#include "bindings/array_cache.hpp"

#include <cstdlib>
#include <mutex>
#include <vector>

namespace halo::bindings {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;

struct Block {
  void* data;
  size_t bytes;
};

class Cache {
 public:
  // A block of at least `bytes` (at most twice that, so big blocks are not wasted on small arrays).
  Block take(size_t bytes) {
    {
      std::lock_guard lock(mutex_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i)
        if (free_[i].bytes >= bytes && free_[i].bytes <= 2 * bytes &&
            (best == free_.size() || free_[i].bytes < free_[best].bytes))
          best = i;
      if (best != free_.size()) {
        const Block block = free_[best];
        free_.erase(free_.begin() + std::ptrdiff_t(best));
        cached_ -= block.bytes;
        return block;
      }
    }
    const size_t rounded = (bytes + 4095) / 4096 * 4096;
    void* data = std::aligned_alloc(4096, rounded);
    if (data == nullptr) throw std::bad_alloc();
    return {data, rounded};
  }

  void give(const Block& block) {
    std::vector<void*> evicted;
    {
      std::lock_guard lock(mutex_);
      if (block.bytes > limit()) {
        evicted.push_back(block.data);
      } else {
        free_.push_back(block);
        cached_ += block.bytes;
        while (cached_ > limit()) {  // the oldest blocks go first
          evicted.push_back(free_.front().data);
          cached_ -= free_.front().bytes;
          free_.erase(free_.begin());
        }
      }
    }
    for (void* data : evicted) std::free(data);
  }

  std::pair<int64_t, int64_t> state() {
    std::lock_guard lock(mutex_);
    return {int64_t(free_.size()), int64_t(cached_)};
  }

  static size_t limit() {
    static const size_t bytes = [] {
      const char* env = std::getenv("HALO_ARRAY_CACHE_MIB");
      const long mib = env != nullptr && *env != '\0' ? std::atol(env) : 512;
      return size_t(mib > 0 ? mib : 0) << 20;
    }();
    return bytes;
  }

 private:
  std::mutex mutex_;
  std::vector<Block> free_;
  size_t cached_ = 0;
};

Cache& cache() {
  static Cache* instance = new Cache();  // never destroyed: arrays may outlive static destruction
  return *instance;
}

}  // namespace

py::array cached_array(Format format, int64_t count) {
  py::array empty = new_array(format, 0);
  const size_t bytes = size_t(count) * size_t(empty.itemsize());
  if (bytes < kMinBytes || Cache::limit() == 0) return new_array(format, count);
  auto* block = new Block(cache().take(bytes));
  py::capsule owner(block, [](void* pointer) {
    auto* held = static_cast<Block*>(pointer);
    cache().give(*held);
    delete held;
  });
  return py::array(empty.dtype(), std::vector<py::ssize_t>{py::ssize_t(count)}, {}, block->data, owner);
}

std::pair<int64_t, int64_t> array_cache_state() { return cache().state(); }

}  // namespace halo::bindings
