// A worker's neuron-group weights on local disk and the memory-budgeted set of them it
// keeps resident (issue 15: devices smaller than their share of the model).
//
// File (".halogrp", little-endian): a 64-byte header, a JSON index right after it, then
// every group's bytes at a multiple of 4096 (so a group is whole pages: read, dropped and
// counted page by page). Header:
//   [0, 8)   magic "HALOGRPS"          [8, 12)  u32 version (1)
//   [12, 16) u32 alignment (4096)       [16, 24) u64 index offset
//   [24, 32) u64 index bytes            [32, 40) u64 XXH3-64 of the index
//   [40, 48) u64 file bytes             [48, 56) u64 reserved (0)
//   [56, 64) u64 XXH3-64 of bytes [0, 56)
// Index: {"meta": {...}, "groups": [{"layer", "part", "index", "offset", "bytes",
// "hash" (XXH3-64 of the group's bytes, 16 hex digits), "tensors": [{"name", "format"
// ("nf4" | "fp4" | "f32"), "blocksize", "shape": [rows, cols], "offset" (from the group's
// start, a multiple of 64), "bytes"}]}]}. A 4-bit tensor is bitsandbytes' layout: the
// packed codes (ceil(n/2) bytes), zero padding to a multiple of 4, then one float32
// absmax per block. A bad header or index fails open(); a group whose bytes run past the
// end of the file or whose hash does not match is marked bad (never loaded, reported by
// errors()) and the rest of the store stays usable.
//
// GroupStore keeps at most `budget_bytes` of groups resident (each in its own anonymous
// mapping, so eviction returns the memory at once; read with O_DIRECT, so the page cache
// keeps no second copy). While the caller computes, loader threads read the groups needed
// soonest (exchange = layer * parts + part, in a cycle; the one whose deadline just passed
// is a whole cycle away) and, among those needed at the same exchange, the most important
// per byte first. They evict unpinned, unused groups needed later than what they bring in:
// the furthest from their next use first (in the cyclic access of a decoder, the groups just
// used: recency), then the least important per byte, then the least recently used.
// Importance is what the caller says: the semantic predictor's scores for the next
// exchanges, static importance for the rest; the most important groups can be pinned.
// acquire() never waits: a group that is not resident at its exchange is missing (the
// caller compensates it like a lost packet).
// Mode::mmap is the baseline that maps the whole file and lets the kernel page it in,
// with the page cache capped at the budget by dropping least-recently-used groups.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "halo/backend/backend.hpp"
#include "halo/core/format.hpp"

namespace halo::edge {

inline constexpr char kStoreMagic[8] = {'H', 'A', 'L', 'O', 'G', 'R', 'P', 'S'};
inline constexpr uint32_t kStoreVersion = 1;
inline constexpr uint64_t kStoreAlignment = 4096;
inline constexpr uint64_t kStoreHeaderBytes = 64;

struct GroupKey {
  int32_t layer = 0;
  int32_t part = 0;
  int32_t index = 0;
  friend bool operator==(const GroupKey&, const GroupKey&) = default;
  friend auto operator<=>(const GroupKey&, const GroupKey&) = default;
};

// A group key from caller integers: InvalidArgument naming `function` and the key unless
// 0 <= layer <= 65535, 0 <= part <= 255 and 0 <= index <= 65535 (the ranges a store file holds).
GroupKey group_key(std::string_view function, int64_t layer, int64_t part, int64_t index);

// The store's tensor formats as its index spells them: "nf4" and "fp4" (the format table's
// names) and "f32" (biases). InvalidArgument naming `function` and the value otherwise.
Format parse_store_format(std::string_view function, std::string_view name);
std::string_view store_format_name(Format format);

// A tensor of a group is stored as Format::nf4 or Format::fp4 (bitsandbytes 4-bit blocks) or
// Format::f32 (biases).
struct TensorEntry {
  std::string name;
  Format format = Format::f32;
  int64_t blocksize = 0;  // 4-bit formats
  int64_t rows = 0, cols = 0;
  uint64_t offset = 0;  // from the group's first byte
  uint64_t bytes = 0;
  int64_t numel() const { return rows * cols; }
  uint64_t absmax_offset() const;  // 4-bit: where the absmax floats start (from the tensor's first byte)
};

struct GroupEntry {
  GroupKey key;
  uint64_t offset = 0;  // in the file
  uint64_t bytes = 0;
  uint64_t hash = 0;
  std::vector<TensorEntry> tensors;
  const TensorEntry* find(const std::string& name) const;
};

// Bytes a tensor takes in the file (4-bit: codes, padding to 4, absmax).
uint64_t tensor_bytes(Format format, int64_t rows, int64_t cols, int64_t blocksize);
uint64_t store_hash(const void* data, uint64_t bytes);  // XXH3-64

// The writer declares every group's tensors up front, so the index can sit before the
// groups: a truncated file loses its last groups, never its index.
struct TensorSpec {
  std::string name;
  Format format = Format::f32;
  int64_t blocksize = 64;  // 4-bit formats
  int64_t rows = 0, cols = 0;
};
struct GroupSpec {
  GroupKey key;
  std::vector<TensorSpec> tensors;
};
// One tensor's data, in the order of its GroupSpec: 4-bit: `packed` and `absmax`
// (bitsandbytes layout); f32: `values` (rows x cols, row-major). The counts must be what
// the spec's shape needs (the writer checks them rather than read past a short buffer).
struct TensorData {
  const uint8_t* packed = nullptr;
  int64_t packed_bytes = 0;
  const float* absmax = nullptr;
  int64_t absmax_count = 0;
  const float* values = nullptr;
  int64_t values_count = 0;
};

// Writes `path`.tmp-<pid> group by group (in layout order) and renames it into place on
// finish(); a writer destroyed before finish() removes its temporary file, so `path` is
// never half-written.
class GroupStoreWriter {
 public:
  GroupStoreWriter(std::string path, std::string meta_json, std::vector<GroupSpec> layout);
  ~GroupStoreWriter();
  GroupStoreWriter(const GroupStoreWriter&) = delete;
  GroupStoreWriter& operator=(const GroupStoreWriter&) = delete;
  // The next group of the layout (its key is checked).
  void write_group(GroupKey key, const std::vector<TensorData>& tensors);
  void finish();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

struct StoreOptions {
  enum class Mode { resident, mmap };
  // "resident" or "mmap"; InvalidArgument naming `function` and the value otherwise.
  static Mode parse_mode(std::string_view function, std::string_view name);
  Mode mode = Mode::resident;
  uint64_t budget_bytes = UINT64_MAX;  // resident groups, page-rounded
  bool prefetch = true;                // run the loader threads
  int loader_threads = 4;              // reads in flight at once
  bool drop_page_cache = true;         // posix_fadvise(DONTNEED) after each read: no second copy in the cache
  double read_bandwidth = 0;           // bytes/s cap on this store's reads (emulates a slower disk); 0: none
  Backend backend = Backend::automatic;
};

struct StoreStats {
  uint64_t resident_bytes = 0;  // page-rounded, resident now
  uint64_t peak_resident_bytes = 0;
  uint64_t pinned_bytes = 0;
  uint64_t bytes_read = 0;  // by this store's reads (mmap mode: 0, the kernel reads)
  uint64_t loads = 0;       // by the loader threads
  uint64_t sync_loads = 0;  // by load_now / pin
  uint64_t evictions = 0;
  uint64_t hits = 0;    // acquire found the group resident
  uint64_t misses = 0;  // acquire did not
  uint64_t failed_loads = 0;
  double read_seconds = 0;  // wall time inside reads
};

class GroupStore {
 public:
  GroupStore(const std::string& path, const StoreOptions& options);
  ~GroupStore();
  GroupStore(const GroupStore&) = delete;
  GroupStore& operator=(const GroupStore&) = delete;

  const std::string& path() const;
  const std::string& meta() const;  // the index's "meta" object as JSON text
  const std::vector<GroupEntry>& groups() const;
  int find(GroupKey key) const;  // position in groups(), -1 when absent
  int exchanges() const;         // the cycle length (layers x parts)
  uint64_t group_pages_bytes(GroupKey key) const;  // what the group counts against the budget

  // The groups this store may make resident (a worker's share; initially all). Groups no
  // longer held are dropped (unless in use: then when released).
  void set_held(const std::vector<GroupKey>& keys);
  // A new budget (a worker's share changed): evicts unpinned, unused groups down to it;
  // throws InvalidArgument when the pinned groups or the largest group do not fit it.
  void set_budget(uint64_t budget_bytes);
  uint64_t budget() const;
  // Non-negative importance per group (default 1).
  void set_importance(const std::vector<GroupKey>& keys, const std::vector<double>& importance);
  // Loads `keys` now, in order, and keeps them resident until unpin(). Throws InvalidArgument
  // when they do not fit the budget; returns the keys that could not be read (bad groups).
  std::vector<GroupKey> pin(const std::vector<GroupKey>& keys);
  void unpin_all();
  // The exchange whose compute starts now: its deadline. The loaders work for those after it.
  // Acquire the exchange's groups first: once it is current, its groups are the furthest
  // from their next use and the first to go.
  void advance(int layer, int part);
  // For each key: 1 if resident (now in use: not evictable until release), else 0. Never waits.
  std::vector<uint8_t> acquire(const std::vector<GroupKey>& keys);
  // Reads the group now if it is not resident (evicting lower-valued groups) and acquires it;
  // false when it is bad or the budget is full of pinned and in-use groups.
  bool load_now(GroupKey key);
  void release(const std::vector<GroupKey>& keys);

  // The entry of tensor `name` of group `key` (throws when either is missing).
  const TensorEntry& tensor(GroupKey key, const std::string& name) const;
  // y[rows, out] = x[rows, in] W^T for tensor `name` of an acquired group (W [out, in]).
  void linear(GroupKey key, const std::string& name, const float* x, int64_t rows, int64_t in, float* y) const;
  // An acquired group's tensor as float32 (dequantized), numel floats.
  void read_tensor(GroupKey key, const std::string& name, float* out) const;
  // An acquired group's tensor bytes as stored (4-bit: codes then absmax).
  std::vector<uint8_t> tensor_bytes(GroupKey key, const std::string& name) const;

  StoreStats stats() const;
  std::vector<std::pair<GroupKey, std::string>> errors() const;  // bad groups and why
  std::vector<GroupKey> resident() const;
  // Blocks until the loader has nothing it may load (tests and benchmarks), at most timeout s.
  bool wait_idle(double timeout_seconds) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// y[rows, out] = x[rows, in] W^T with W a 4-bit [out, in] tensor in bitsandbytes' layout:
// each row of W is dequantized into a small buffer and dotted with every row of x. The
// scalar backend is the reference (row by row, float sums in order).
void linear_4bit(const float* x, int64_t rows, int64_t in, const uint8_t* packed, const float* absmax,
                 Format type, int64_t blocksize, int64_t out, float* y, Backend backend = Backend::automatic);

}  // namespace halo::edge
