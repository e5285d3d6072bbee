// GroupStore: the resident set under a memory budget, its loader threads and the mmap baseline.
//
// One mutex guards every slot's state; reads run outside it into a buffer whose pages were
// counted against the budget before the read started, so resident + loading bytes never
// exceed the budget. A slot in use (acquired) is never evicted, so compute reads its bytes
// without the lock.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <thread>

#include "group_store_file.hpp"
#include "halo/core/error.hpp"
#include "halo/edge/group_store.hpp"
#include "halo/quant/quant4.hpp"

namespace halo::edge {

namespace {

std::string key_text(GroupKey k) {
  return "(" + std::to_string(k.layer) + ", " + std::to_string(k.part) + ", " + std::to_string(k.index) + ")";
}


uint64_t page_bytes() {
  static const uint64_t size = [] {
    const long v = ::sysconf(_SC_PAGESIZE);
    return v > 0 ? uint64_t(v) : uint64_t(4096);
  }();
  return size;
}

enum class State : uint8_t { absent, loading, resident, bad };

struct Slot {
  State state = State::absent;
  uint8_t* data = nullptr;  // resident mode: an anonymous mapping of `pages` bytes
  uint64_t pages = 0;       // the group's bytes rounded up to whole pages
  int in_use = 0;
  bool pinned = false;
  bool held = true;
  bool touched = false;  // mmap mode: counted in the emulated page cache
  double importance = 1.0;
  uint64_t last_use = 0;
  int exchange = 0;
  std::string error;
};

}  // namespace

struct GroupStore::Impl {
  std::string path;
  StoreOptions options;
  int fd = -1;
  int direct_fd = -1;  // O_DIRECT reads (drop_page_cache): no copy in the page cache at all
  detail::StoreIndex index;
  std::map<GroupKey, int> by_key;
  int cycle = 1;
  int parts = 1;
  Backend backend = Backend::automatic;

  mutable std::mutex mu;
  std::condition_variable work_cv;          // the loader waits for something to do
  mutable std::condition_variable done_cv;  // a load finished / the loader went idle
  std::vector<Slot> slots;
  uint64_t used = 0;              // resident + loading bytes (mmap mode: touched bytes)
  int current = -1;               // the exchange whose deadline passed last
  uint64_t tick = 0;
  bool stop = false;
  uint64_t generation = 0;          // bumped whenever the loaders may have new work
  std::vector<uint64_t> idle_since;  // per loader: the generation it went idle at (0: busy)
  StoreStats stats;
  std::vector<std::thread> loaders;
  std::list<int> lru;  // mmap mode: touched groups, most recent first

  uint8_t* map = nullptr;  // mmap mode: the whole file
  uint64_t map_bytes = 0;
  std::vector<unsigned char> residency;  // mincore's answer
  std::mutex throttle_mu;
  std::chrono::steady_clock::time_point disk_free{};  // read_bandwidth: when the emulated disk is free

  ~Impl() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    work_cv.notify_all();
    for (auto& t : loaders) t.join();
    for (auto& s : slots)
      if (options.mode == StoreOptions::Mode::resident && s.data != nullptr) ::munmap(s.data, s.pages);
    if (map != nullptr) ::munmap(map, map_bytes);
    if (direct_fd >= 0) ::close(direct_fd);
    if (fd >= 0) ::close(fd);
  }

  int slot_of(GroupKey key, const char* fn) const {
    const auto it = by_key.find(key);
    require(it != by_key.end(), fn, "group ", key_text(key), " is not in the store ", path);
    return it->second;
  }

  // Exchanges until slot g is next computed, in [1, cycle]: the next exchange is 1, the one
  // whose deadline just passed is a whole cycle away.
  int distance(int g) const {
    const int d = ((slots[g].exchange - current - 1) % cycle + cycle) % cycle;
    return d + 1;
  }

  // Importance per MiB: what a group is worth among those needed at the same exchange.
  double value(int g) const {
    const Slot& s = slots[g];
    return s.importance / (double(s.pages) / double(1 << 20));
  }

  bool evictable(int g) const {
    const Slot& s = slots[g];
    return s.state == State::resident && !s.pinned && s.in_use == 0;
  }

  void drop(int g) {
    Slot& s = slots[g];
    if (s.data != nullptr) ::munmap(s.data, s.pages);
    s.data = nullptr;
    s.state = State::absent;
    used -= s.pages;
    ++stats.evictions;
  }

  // Whether a should be evicted before b: needed later, then worth less, then used longer ago.
  bool evict_before(int a, int b) const {
    const int da = distance(a), db = distance(b);
    if (da != db) return da > db;
    const double va = value(a), vb = value(b);
    if (va != vb) return va < vb;
    return slots[size_t(a)].last_use < slots[size_t(b)].last_use;
  }

  // Frees room for `need` bytes by evicting unpinned, unused groups in evict_before order.
  // For the loaders (`candidate` >= 0) only groups that evict_before the candidate itself: a
  // resident group is never dropped for one needed later (a group in hand for one that may
  // come too late). All or nothing.
  bool make_room(uint64_t need, int candidate) {
    if (need > options.budget_bytes) return false;
    if (used + need <= options.budget_bytes) return true;
    // Victims are picked one at a time: groups are of similar size, so one or two usually
    // make the room, and a full sort would cost more.
    std::vector<int> pool;
    for (int g = 0; g < int(slots.size()); ++g)
      if (evictable(g) && (candidate < 0 || evict_before(g, candidate))) pool.push_back(g);
    uint64_t freed = 0;
    size_t take = 0;
    while (used - freed + need > options.budget_bytes) {
      if (take == pool.size()) return false;
      size_t best = take;
      for (size_t i = take + 1; i < pool.size(); ++i)
        if (evict_before(pool[i], pool[best])) best = i;
      std::swap(pool[take], pool[best]);
      freed += slots[size_t(pool[take])].pages;
      ++take;
    }
    for (size_t i = 0; i < take; ++i) drop(pool[i]);
    return true;
  }

  // Reads group g into a fresh mapping (outside the lock); false with `error` set on failure.
  bool read_group(int g, uint8_t*& out, std::string& error) {
    const GroupEntry& e = index.groups[size_t(g)];
    const uint64_t pages = slots[size_t(g)].pages;
    // MAP_POPULATE: one call faults in every page, rather than one fault per page during the read.
    void* buffer = ::mmap(nullptr, pages, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (buffer == MAP_FAILED) {
      error = std::string("cannot allocate ") + std::to_string(pages) + " bytes (" + std::strerror(errno) + ")";
      return false;
    }
    auto* bytes = static_cast<uint8_t*>(buffer);
    uint64_t got = 0;
    // O_DIRECT first (whole pages into the page-aligned buffer: the padding after a group is
    // part of the file, the last group may come back short at the end of the file); the
    // buffered descriptor finishes what O_DIRECT cannot (unaligned remainder, EINVAL).
    bool direct = direct_fd >= 0;
    while (got < e.bytes) {
      const int from = direct ? direct_fd : fd;
      const uint64_t want = direct ? pages - got : e.bytes - got;
      const ssize_t n = ::pread(from, bytes + got, want, off_t(e.offset + got));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && direct && errno == EINVAL) {
        direct = false;
        continue;
      }
      if (n < 0) {
        error = std::string("read failed (") + std::strerror(errno) + ")";
        break;
      }
      if (n == 0) {
        error = "truncated: read " + std::to_string(got) + " of " + std::to_string(e.bytes) +
                " bytes at offset " + std::to_string(e.offset);
        break;
      }
      got += uint64_t(n);
      if (got % kStoreAlignment != 0) direct = false;
    }
    throttle(got);
    // What the buffered path read leaves the page cache again: the device keeps one copy.
    if (options.drop_page_cache && direct_fd < 0)
      ::posix_fadvise(fd, off_t(e.offset), off_t(e.bytes), POSIX_FADV_DONTNEED);
    if (error.empty()) {
      const uint64_t h = store_hash(bytes, e.bytes);
      if (h != e.hash) {
        char text[96];
        std::snprintf(text, sizeof text, "checksum mismatch (index %016llx, data %016llx): the store file is corrupt",
                      static_cast<unsigned long long>(e.hash), static_cast<unsigned long long>(h));
        error = text;
      }
    }
    if (!error.empty()) {
      ::munmap(buffer, pages);
      return false;
    }
    out = bytes;
    return true;
  }

  // read_bandwidth: the emulated disk serves reads one after another at that rate; a read
  // returns no earlier than its turn ends (the real read's time counts towards it).
  void throttle(uint64_t bytes) {
    if (options.read_bandwidth <= 0) return;
    const auto cost = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
        std::chrono::duration<double>(double(bytes) / options.read_bandwidth));
    std::chrono::steady_clock::time_point done;
    {
      std::lock_guard<std::mutex> lock(throttle_mu);
      disk_free = std::max(disk_free, std::chrono::steady_clock::now()) + cost;
      done = disk_free;
    }
    std::this_thread::sleep_until(done);
  }

  // With the lock held: loads g (already reserved as `loading`) releasing the lock meanwhile.
  bool finish_load(std::unique_lock<std::mutex>& lock, int g, bool sync) {
    lock.unlock();
    const auto t0 = std::chrono::steady_clock::now();
    uint8_t* data = nullptr;
    std::string error;
    const bool ok = read_group(g, data, error);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    lock.lock();
    Slot& s = slots[size_t(g)];
    stats.read_seconds += seconds;
    if (ok) {
      s.data = data;
      s.state = State::resident;
      stats.bytes_read += index.groups[size_t(g)].bytes;
      ++(sync ? stats.sync_loads : stats.loads);
      stats.peak_resident_bytes = std::max(stats.peak_resident_bytes, used);
    } else {
      s.state = State::bad;
      s.error = error;
      used -= s.pages;
      ++stats.failed_loads;
    }
    done_cv.notify_all();
    return ok;
  }

  // The next group to read: the soonest needed, then the most valuable (importance 0: never).
  int best_candidate() const {
    int best = -1;
    for (int g = 0; g < int(slots.size()); ++g) {
      const Slot& s = slots[size_t(g)];
      if (s.state != State::absent || !s.held || s.importance <= 0.0) continue;
      if (best < 0 || evict_before(best, g)) best = g;
    }
    return best;
  }

  // Several loaders keep several reads in flight (O_DIRECT reads are synchronous, and the
  // disk is faster with a queue); each takes the best candidate no other one is reading.
  void loader_main(size_t id) {
    std::unique_lock<std::mutex> lock(mu);
    while (!stop) {
      const int g = best_candidate();
      if (g < 0 || !make_room(slots[size_t(g)].pages, g)) {
        const uint64_t seen = generation;
        idle_since[id] = seen + 1;
        done_cv.notify_all();
        work_cv.wait(lock, [&] { return stop || generation != seen; });
        idle_since[id] = 0;
        continue;
      }
      slots[size_t(g)].state = State::loading;
      used += slots[size_t(g)].pages;
      finish_load(lock, g, false);
    }
    idle_since[id] = generation + 1;
    done_cv.notify_all();
  }

  bool loaders_idle() const {
    for (uint64_t since : idle_since)
      if (since != generation + 1) return false;
    return true;
  }

  void wake() {
    ++generation;
    work_cv.notify_all();
  }

  // mmap mode: how much of the file the page cache holds now (mincore: the pages the
  // kernel read ahead count too, as they would against a real memory limit).
  uint64_t cached_bytes(uint64_t offset, uint64_t bytes) {
    const uint64_t page = page_bytes();
    const uint64_t first = offset / page, count = (std::min(offset + bytes, map_bytes) + page - 1) / page - first;
    residency.resize(size_t(count));
    if (count == 0 || ::mincore(map + first * page, count * page, residency.data()) != 0) return 0;
    uint64_t pages = 0;
    for (unsigned char v : residency) pages += v & 1u;
    return pages * page;
  }

  // Takes a range out of this mapping and out of the page cache. MADV_PAGEOUT reclaims
  // pages of large folios that reach past the range, where fadvise(DONTNEED) skips them.
  void evict_range(uint64_t offset, uint64_t bytes) {
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif
    ::madvise(map + offset, bytes, MADV_PAGEOUT);
    ::madvise(map + offset, bytes, MADV_DONTNEED);
    ::posix_fadvise(fd, off_t(offset), off_t(bytes), POSIX_FADV_DONTNEED);
  }

  // mmap mode: g was just used (most recent in the LRU order of groups).
  void touch_mapped(int g) {
    Slot& s = slots[size_t(g)];
    if (s.touched) lru.remove(g);
    s.touched = true;
    lru.push_front(g);
  }

  // mmap mode: while the file's cached pages exceed the budget, evicts the least recently
  // used groups not in use, then (only readahead left over) every range not in use: the
  // emulation of a memory limit on the page cache (a cgroup would impose one for real).
  void cap_mapped() {
    const uint64_t data_start = index.groups.front().offset;
    uint64_t cached = cached_bytes(data_start, map_bytes - data_start);
    for (auto it = lru.end(); cached > options.budget_bytes && it != lru.begin();) {
      --it;
      const int victim = *it;
      Slot& v = slots[size_t(victim)];
      if (v.in_use > 0) continue;
      const GroupEntry& e = index.groups[size_t(victim)];
      const uint64_t before = cached_bytes(e.offset, v.pages);
      evict_range(e.offset, v.pages);
      cached -= std::min(cached, before - std::min(before, cached_bytes(e.offset, v.pages)));
      v.touched = false;
      ++stats.evictions;
      it = lru.erase(it);
    }
    if (cached > options.budget_bytes) {
      uint64_t from = data_start;
      for (size_t i = 0; i <= slots.size(); ++i) {
        const bool end = i == slots.size();
        if (!end && slots[i].in_use == 0) continue;
        const uint64_t to = end ? map_bytes : index.groups[i].offset;
        if (to > from) evict_range(from, to - from);
        if (!end) from = index.groups[i].offset + slots[i].pages;
      }
      for (auto& v : slots)
        if (v.in_use == 0) v.touched = false;
      lru.remove_if([&](int x) { return !slots[size_t(x)].touched; });
      cached = cached_bytes(data_start, map_bytes - data_start);
    }
    used = cached;
    stats.peak_resident_bytes = std::max(stats.peak_resident_bytes, used);
  }

  const uint8_t* acquired_bytes(GroupKey key, const char* fn, const TensorEntry*& tensor,
                                const std::string& name) const {
    std::lock_guard<std::mutex> lock(mu);
    const int g = slot_of(key, fn);
    const Slot& s = slots[size_t(g)];
    require(s.in_use > 0, fn, "group ", key_text(key), " is not acquired");
    tensor = index.groups[size_t(g)].find(name);
    require(tensor != nullptr, fn, "group ", key_text(key), " has no tensor '", name, "'");
    const uint8_t* base = options.mode == StoreOptions::Mode::mmap ? map + index.groups[size_t(g)].offset : s.data;
    return base + tensor->offset;
  }
};

GroupStore::GroupStore(const std::string& path, const StoreOptions& options) : impl_(std::make_unique<Impl>()) {
  const char* fn = "GroupStore";
  Impl& m = *impl_;
  m.path = path;
  m.options = options;
  require(options.budget_bytes > 0, fn, "the memory budget must be positive");
  require(options.loader_threads >= 1 && options.loader_threads <= 64, fn, "loader_threads must be in [1, 64], got ",
          options.loader_threads);
  require(std::isfinite(options.read_bandwidth) && options.read_bandwidth >= 0, fn,
          "read_bandwidth must be a non-negative number of bytes/s, got ", options.read_bandwidth);
  require(resolve(options.backend) != Backend::cuda, fn, "computes on the host; backend 'cuda' is not accepted");
  m.backend = options.backend;
  m.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  require<FormatError>(m.fd >= 0, fn, path, ": cannot open (", std::strerror(errno), ")");
  m.index = detail::read_index(m.fd, path);
  const uint64_t page = page_bytes();
  int layers = 0;
  for (size_t i = 0; i < m.index.groups.size(); ++i) {
    const GroupEntry& e = m.index.groups[i];
    m.by_key[e.key] = int(i);
    layers = std::max(layers, e.key.layer + 1);
    m.parts = std::max(m.parts, e.key.part + 1);
  }
  m.cycle = layers * m.parts;
  m.slots.resize(m.index.groups.size());
  uint64_t largest = 0;
  for (size_t i = 0; i < m.slots.size(); ++i) {
    const GroupEntry& e = m.index.groups[i];
    Slot& s = m.slots[i];
    s.pages = detail::align_up(e.bytes, page);
    s.exchange = e.key.layer * m.parts + e.key.part;
    largest = std::max(largest, s.pages);
    if (!m.index.problems[i].empty()) {
      s.state = State::bad;
      s.error = m.index.problems[i];
    }
  }
  require(options.budget_bytes >= largest, fn, "a memory budget of ", options.budget_bytes,
          " bytes cannot hold the largest group (", largest, " bytes)");
  if (options.mode == StoreOptions::Mode::mmap) {
    struct stat st{};
    ::fstat(m.fd, &st);
    m.map_bytes = uint64_t(st.st_size);
    void* map = ::mmap(nullptr, m.map_bytes, PROT_READ, MAP_SHARED, m.fd, 0);
    require<FormatError>(map != MAP_FAILED, fn, path, ": mmap failed (", std::strerror(errno), ")");
    m.map = static_cast<uint8_t*>(map);
  } else {
    if (options.drop_page_cache) {
      // Without O_DIRECT (tmpfs...), reads go through the cache and are dropped after each
      // group; no readahead then, or it would pull in (and keep) the groups around it.
      m.direct_fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
      if (m.direct_fd < 0) ::posix_fadvise(m.fd, 0, 0, POSIX_FADV_RANDOM);
    }
  }
  if (options.mode == StoreOptions::Mode::resident && options.prefetch) {
    const size_t count = size_t(std::max(1, options.loader_threads));
    m.idle_since.assign(count, 0);
    for (size_t i = 0; i < count; ++i) m.loaders.emplace_back([&m, i] { m.loader_main(i); });
  }
}

GroupStore::~GroupStore() = default;

const std::string& GroupStore::path() const { return impl_->path; }
const std::string& GroupStore::meta() const { return impl_->index.meta; }
const std::vector<GroupEntry>& GroupStore::groups() const { return impl_->index.groups; }
int GroupStore::exchanges() const { return impl_->cycle; }

int GroupStore::find(GroupKey key) const {
  const auto it = impl_->by_key.find(key);
  return it == impl_->by_key.end() ? -1 : it->second;
}

uint64_t GroupStore::group_pages_bytes(GroupKey key) const {
  return impl_->slots[size_t(impl_->slot_of(key, "GroupStore.group_pages_bytes"))].pages;
}

void GroupStore::set_held(const std::vector<GroupKey>& keys) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  std::vector<int> held;
  for (const auto& k : keys) held.push_back(m.slot_of(k, "GroupStore.set_held"));
  for (auto& s : m.slots) s.held = false;
  for (int g : held) m.slots[size_t(g)].held = true;
  for (int g = 0; g < int(m.slots.size()); ++g) {
    Slot& s = m.slots[size_t(g)];
    if (s.held) continue;
    s.pinned = false;
    if (s.state == State::resident && s.in_use == 0 && m.options.mode == StoreOptions::Mode::resident) m.drop(g);
  }
  m.wake();
}

void GroupStore::set_budget(uint64_t budget_bytes) {
  const char* fn = "GroupStore.set_budget";
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  uint64_t pinned = 0, largest = 0;
  for (const auto& s : m.slots) {
    if (s.pinned) pinned += s.pages;
    if (s.held) largest = std::max(largest, s.pages);
  }
  require(budget_bytes >= largest && budget_bytes >= pinned, fn, "a budget of ", budget_bytes,
          " bytes cannot hold the largest held group (", largest, " bytes) and the pinned ones (", pinned, " bytes)");
  m.options.budget_bytes = budget_bytes;
  if (m.options.mode == StoreOptions::Mode::resident) m.make_room(0, -1);
  m.wake();
}

uint64_t GroupStore::budget() const { return impl_->options.budget_bytes; }

void GroupStore::set_importance(const std::vector<GroupKey>& keys, const std::vector<double>& importance) {
  const char* fn = "GroupStore.set_importance";
  Impl& m = *impl_;
  require(keys.size() == importance.size(), fn, keys.size(), " keys but ", importance.size(), " values");
  std::lock_guard<std::mutex> lock(m.mu);
  std::vector<int> slots;
  for (size_t i = 0; i < keys.size(); ++i) {
    require(std::isfinite(importance[i]) && importance[i] >= 0.0, fn, "importance of group ", key_text(keys[i]),
            " must be finite and non-negative, got ", importance[i]);
    slots.push_back(m.slot_of(keys[i], fn));
  }
  for (size_t i = 0; i < keys.size(); ++i) m.slots[size_t(slots[i])].importance = importance[i];
  m.wake();
}

std::vector<GroupKey> GroupStore::pin(const std::vector<GroupKey>& keys) {
  const char* fn = "GroupStore.pin";
  Impl& m = *impl_;
  std::vector<GroupKey> failed;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    uint64_t total = 0;
    for (const auto& k : keys) {
      const Slot& s = m.slots[size_t(m.slot_of(k, fn))];
      if (!s.pinned) total += s.pages;
    }
    for (const auto& s : m.slots)
      if (s.pinned) total += s.pages;
    require(total <= m.options.budget_bytes, fn, "pinned groups would take ", total, " bytes, over the budget of ",
            m.options.budget_bytes);
  }
  for (const auto& k : keys) {
    if (!load_now(k)) {
      std::lock_guard<std::mutex> lock(m.mu);
      const Slot& s = m.slots[size_t(m.slot_of(k, fn))];
      require(s.state == State::bad, fn, "no room to pin group ", key_text(k), " (the budget is full of groups in use)");
      failed.push_back(k);
      continue;
    }
    std::lock_guard<std::mutex> lock(m.mu);
    Slot& s = m.slots[size_t(m.slot_of(k, fn))];
    s.pinned = true;
    --s.in_use;
  }
  std::lock_guard<std::mutex> lock(m.mu);
  m.stats.pinned_bytes = 0;
  for (const auto& s : m.slots)
    if (s.pinned) m.stats.pinned_bytes += s.pages;
  return failed;
}

void GroupStore::unpin_all() {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  for (auto& s : m.slots) s.pinned = false;
  m.stats.pinned_bytes = 0;
  m.wake();
}

void GroupStore::advance(int layer, int part) {
  Impl& m = *impl_;
  require(layer >= 0 && part >= 0 && part < m.parts && layer * m.parts + part < m.cycle, "GroupStore.advance",
          "no exchange (layer ", layer, ", part ", part, ") in this store");
  std::lock_guard<std::mutex> lock(m.mu);
  m.current = layer * m.parts + part;
  m.wake();
}

std::vector<uint8_t> GroupStore::acquire(const std::vector<GroupKey>& keys) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  std::vector<int> slots;
  for (const auto& k : keys) slots.push_back(m.slot_of(k, "GroupStore.acquire"));
  std::vector<uint8_t> out(keys.size(), 0);
  for (size_t i = 0; i < slots.size(); ++i) {
    Slot& s = m.slots[size_t(slots[i])];
    s.last_use = ++m.tick;
    const bool here = m.options.mode == StoreOptions::Mode::mmap ? s.state != State::bad : s.state == State::resident;
    if (!here) {
      ++m.stats.misses;
      continue;
    }
    ++m.stats.hits;
    ++s.in_use;
    out[i] = 1;
    if (m.options.mode == StoreOptions::Mode::mmap) m.touch_mapped(slots[i]);
  }
  if (m.options.mode == StoreOptions::Mode::mmap) m.cap_mapped();
  return out;
}

bool GroupStore::load_now(GroupKey key) {
  const char* fn = "GroupStore.load_now";
  Impl& m = *impl_;
  std::unique_lock<std::mutex> lock(m.mu);
  const int g = m.slot_of(key, fn);
  Slot& s = m.slots[size_t(g)];
  require(s.held, fn, "group ", key_text(key), " is not held by this store");
  if (m.options.mode == StoreOptions::Mode::mmap) {
    if (s.state == State::bad) return false;
    ++s.in_use;
    s.last_use = ++m.tick;
    m.touch_mapped(g);
    m.cap_mapped();
    return true;
  }
  m.done_cv.wait(lock, [&] { return s.state != State::loading; });
  s.last_use = ++m.tick;
  if (s.state == State::bad) return false;
  if (s.state == State::resident) {
    ++s.in_use;
    return true;
  }
  if (!m.make_room(s.pages, -1)) return false;
  s.state = State::loading;
  m.used += s.pages;
  if (!m.finish_load(lock, g, true)) return false;
  ++s.in_use;
  return true;
}

void GroupStore::release(const std::vector<GroupKey>& keys) {
  const char* fn = "GroupStore.release";
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  std::vector<int> slots;
  for (const auto& k : keys) {
    const int g = m.slot_of(k, fn);
    require(m.slots[size_t(g)].in_use > 0, fn, "group ", key_text(k), " is not acquired");
    slots.push_back(g);
  }
  for (int g : slots) {
    Slot& s = m.slots[size_t(g)];
    --s.in_use;
    if (s.in_use == 0 && !s.held && s.state == State::resident && m.options.mode == StoreOptions::Mode::resident)
      m.drop(g);
  }
  m.wake();
}

const TensorEntry& GroupStore::tensor(GroupKey key, const std::string& name) const {
  const char* fn = "GroupStore.tensor";
  const TensorEntry* t = impl_->index.groups[size_t(impl_->slot_of(key, fn))].find(name);
  require(t != nullptr, fn, "group ", key_text(key), " has no tensor '", name, "'");
  return *t;
}

void GroupStore::linear(GroupKey key, const std::string& name, const float* x, int64_t rows, int64_t in,
                        float* y) const {
  const char* fn = "GroupStore.linear";
  const TensorEntry* t = nullptr;
  const uint8_t* bytes = impl_->acquired_bytes(key, fn, t, name);
  require(in == t->cols && rows >= 0, fn, "tensor '", name, "' of group ", key_text(key), " takes inputs of ",
          t->cols, ", got [", rows, ", ", in, "]");
  if (t->format == Format::f32) {
    const auto* w = reinterpret_cast<const float*>(bytes);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < t->rows; ++o) {
        float total = 0.0f;
        for (int64_t i = 0; i < t->cols; ++i) total += x[r * t->cols + i] * w[o * t->cols + i];
        y[r * t->rows + o] = total;
      }
    return;
  }
  linear_4bit(x, rows, t->cols, bytes, reinterpret_cast<const float*>(bytes + t->absmax_offset()),
              t->format, t->blocksize, t->rows, y, impl_->backend);
}

void GroupStore::read_tensor(GroupKey key, const std::string& name, float* out) const {
  const TensorEntry* t = nullptr;
  const uint8_t* bytes = impl_->acquired_bytes(key, "GroupStore.read_tensor", t, name);
  if (t->format == Format::f32) {
    std::memcpy(out, bytes, size_t(t->numel()) * 4);
    return;
  }
  dequantize_4bit_range(bytes, reinterpret_cast<const float*>(bytes + t->absmax_offset()), t->format,
                        t->blocksize, 0, t->numel(), out, impl_->backend);
}

std::vector<uint8_t> GroupStore::tensor_bytes(GroupKey key, const std::string& name) const {
  const TensorEntry* t = nullptr;
  const uint8_t* bytes = impl_->acquired_bytes(key, "GroupStore.tensor_bytes", t, name);
  return std::vector<uint8_t>(bytes, bytes + t->bytes);
}

StoreStats GroupStore::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  StoreStats out = impl_->stats;
  out.resident_bytes = impl_->used;
  for (const auto& s : impl_->slots)
    if (s.state == State::loading) out.resident_bytes -= s.pages;
  return out;
}

std::vector<std::pair<GroupKey, std::string>> GroupStore::errors() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<std::pair<GroupKey, std::string>> out;
  for (size_t i = 0; i < impl_->slots.size(); ++i)
    if (impl_->slots[i].state == State::bad) out.emplace_back(impl_->index.groups[i].key, impl_->slots[i].error);
  return out;
}

std::vector<GroupKey> GroupStore::resident() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<GroupKey> out;
  for (size_t i = 0; i < impl_->slots.size(); ++i) {
    const Slot& s = impl_->slots[i];
    const bool here = impl_->options.mode == StoreOptions::Mode::mmap ? s.touched : s.state == State::resident;
    if (here) out.push_back(impl_->index.groups[i].key);
  }
  return out;
}

bool GroupStore::wait_idle(double timeout_seconds) const {
  Impl& m = *impl_;
  std::unique_lock<std::mutex> lock(m.mu);
  if (m.loaders.empty()) return true;
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(std::max(0.0, timeout_seconds));
  return m.done_cv.wait_until(lock, until, [&] { return m.loaders_idle(); });
}

}  // namespace halo::edge
