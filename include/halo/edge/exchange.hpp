// One tensor-parallel exchange of the edge runtime, both ends:
//   send_input    root -> worker: the layer input and which of the worker's groups are critical;
//   send_partial  worker -> root: one group's additive output term, cut into
//                 messages that each fit one datagram so a lost packet costs a
//                 few rows of one group, not the whole answer;
//   send_partials a worker's terms of several groups at once; sent unreliably with
//                 fec_k > 0, every fec_k datagrams of one shape are followed by
//                 a parity message (wire.hpp) from which the root rebuilds any
//                 one of them that is lost, without waiting;
//   gather        the root's wait: collects the partials of one exchange into
//                 out[groups, rows, cols] until all arrived, or (unless
//                 wait_all) the critical ones arrived and the deadline passed,
//                 or the hard deadline passed. It never waits past hard_deadline.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "halo/edge/transport.hpp"
#include "halo/edge/wire.hpp"

namespace halo::edge {

// header: step, pos, layer, part, rows, cols, flags (kind and count are set here).
bool send_input(Transport& transport, int32_t peer, const Header& header, std::span<const uint16_t> critical,
                const float* rows, Delivery delivery);

// header: step, pos, layer, part, group, cols (row0/rows are set per message).
// `duplicate` also sends an unreliable copy first: whichever arrives first counts.
int32_t send_partial(Transport& transport, int32_t peer, const Header& header, const float* rows, int32_t n_rows,
                     Delivery delivery, bool duplicate);

// header: step, pos, layer, part (group, row0, rows, cols are set per message); `groups`
// ids, rows: [groups.size(), n_rows, cols] float32. fec_k: 0 off, else 1..kFecMaxK
// partials per parity set (only for Delivery::unreliable; the datagrams of each shape are
// split into ceil(n / fec_k) sets of nearly equal size, each followed by its parity).
// Returns the partial messages sent (parity not counted).
int32_t send_partials(Transport& transport, int32_t peer, const Header& header, std::span<const uint16_t> groups,
                      const float* rows, int32_t n_rows, int32_t cols, Delivery delivery, int32_t fec_k);

struct GatherSpec {
  uint32_t step = 0;
  uint16_t layer = 0;
  uint8_t part = 0;
  int32_t rows = 0, cols = 0;
  std::vector<int32_t> peer_of_group;  // who computes each group; -1: nobody (never awaited)
  std::vector<uint8_t> critical;       // per group
  double deadline = 0;                 // absolute monotonic seconds
  double hard_deadline = 0;
  bool wait_all = false;
  bool fec = false;  // use parity messages: rebuild a partial that is the only one missing from its set
};

// A term of an earlier exchange that arrived after that exchange's deadline.
struct LateArrival {
  uint32_t step = 0;
  uint16_t group = 0;
  int32_t peer = -1;
  double time = 0;
};

struct GatherResult {
  enum class End { complete, deadline, hard_deadline } end = End::complete;
  std::vector<uint8_t> received;      // groups x rows
  std::vector<double> peer_last;      // per peer id: arrival of its last awaited row (-1: none)
  std::vector<double> peer_heard;     // per peer id: arrival of its last partial of any step (-1: none)
  std::vector<int32_t> peer_missing;  // per peer id: awaited rows that did not come
  std::vector<Event> other;           // control messages, connects and disconnects seen meanwhile
  int64_t stale = 0;                  // partials of other exchanges (dropped)
  std::vector<LateArrival> late;      // their first rows, at most 4096 (the monitor tells late from lost)
  int64_t duplicates = 0;             // rows that arrived twice (the redundant copy)
  int64_t malformed = 0;              // messages that failed to decode or came from the wrong peer
  std::vector<uint8_t> rebuilt;       // fec: groups x rows, 1 where a row was rebuilt from parity
  int64_t parity = 0;                 // parity messages of this exchange kept (fec)
  int64_t parity_refused = 0;         // parity messages refused: malformed, foreign, repeated, over budget
  double end_time = 0;
};

GatherResult gather(Transport& transport, const GatherSpec& spec, float* out);

}  // namespace halo::edge
