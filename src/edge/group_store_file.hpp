// The group store's file format, shared by the writer and GroupStore (see
// include/halo/edge/group_store.hpp for the layout).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "halo/edge/group_store.hpp"

namespace halo::edge::detail {

struct StoreIndex {
  std::string meta;  // JSON text of the index's "meta" object
  std::vector<GroupEntry> groups;
  std::vector<std::string> problems;  // per group: "" or why it is unusable (e.g. truncated)
  uint64_t file_bytes = 0;            // as the header says
};

// Reads and checks the header and index of the open file `fd`; throws FormatError naming
// `path` for a bad header or index. Groups past the end of a truncated file get a problem.
StoreIndex read_index(int fd, const std::string& path);

constexpr uint64_t align_up(uint64_t value, uint64_t alignment) { return (value + alignment - 1) / alignment * alignment; }

}  // namespace halo::edge::detail
