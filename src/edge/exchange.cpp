#include "halo/edge/exchange.hpp"

#include <algorithm>
#include <cstdlib>
#include <map>

#include "halo/core/convert.hpp"
#include "halo/core/error.hpp"

namespace halo::edge {

namespace {

// Rows of `cols` float16 values that fit one datagram of the transport (at least 1).
int32_t rows_per_message(const Transport& transport, int32_t cols) {
  const size_t room = transport.datagram_payload() > kHeaderBytes ? transport.datagram_payload() - kHeaderBytes : 0;
  return int32_t(std::clamp<size_t>(room / (2 * size_t(cols)), 1, 65535));
}

}  // namespace

bool send_input(Transport& transport, int32_t peer, const Header& header, std::span<const uint16_t> critical,
                const float* rows, Delivery delivery) {
  const std::vector<uint8_t> message = make_input(header, critical, rows);
  const bool ok = transport.send(peer, message, delivery);
  transport.flush();
  return ok;
}

int32_t send_partial(Transport& transport, int32_t peer, const Header& header, const float* rows, int32_t n_rows,
                     Delivery delivery, bool duplicate) {
  constexpr const char* fn = "edge.send_partial";
  require(n_rows >= 0 && n_rows <= 65535, fn, "rows must be in [0, 65535], got ", n_rows);
  require(header.cols > 0, fn, "cols must be > 0");
  const int32_t per_message = rows_per_message(transport, header.cols);
  int32_t sent = 0;
  for (int32_t r0 = 0; r0 < n_rows; r0 += per_message) {
    Header h = header;
    h.row0 = uint16_t(r0);
    h.rows = uint16_t(std::min(per_message, n_rows - r0));
    const float* at = rows + size_t(r0) * header.cols;
    if (duplicate && delivery != Delivery::unreliable) {
      Header copy = h;
      copy.flags |= kFlagDuplicate;
      transport.send(peer, make_partial(copy, at), Delivery::unreliable);
    }
    sent += transport.send(peer, make_partial(h, at), delivery) ? 1 : 0;
  }
  transport.flush();
  return sent;
}

int32_t send_partials(Transport& transport, int32_t peer, const Header& header, std::span<const uint16_t> groups,
                      const float* rows, int32_t n_rows, int32_t cols, Delivery delivery, int32_t fec_k) {
  constexpr const char* fn = "edge.send_partials";
  require(n_rows >= 0 && n_rows <= 65535, fn, "rows must be in [0, 65535], got ", n_rows);
  require(cols > 0 && cols <= 65535, fn, "cols must be in [1, 65535], got ", cols);
  require(fec_k >= 0 && fec_k <= int32_t(kFecMaxK), fn, "fec_k must be in [0, ", kFecMaxK, "], got ", fec_k);
  const int32_t per_message = rows_per_message(transport, cols);
  std::vector<std::vector<uint8_t>> messages;
  for (size_t i = 0; i < groups.size(); ++i) {
    for (int32_t r0 = 0; r0 < n_rows; r0 += per_message) {
      Header h = header;
      h.flags = 0;
      h.group = groups[i];
      h.row0 = uint16_t(r0);
      h.rows = uint16_t(std::min(per_message, n_rows - r0));
      h.cols = uint16_t(cols);
      messages.push_back(make_partial(h, rows + (i * size_t(n_rows) + r0) * cols));
    }
  }
  int32_t sent = 0;
  if (fec_k == 0 || delivery != Delivery::unreliable) {
    for (const auto& m : messages) sent += transport.send(peer, m, delivery) ? 1 : 0;
    transport.flush();
    return sent;
  }
  // Parity sets of equal shape (a group's last rows may be fewer), each sent right after its
  // members. Every message is flushed on its own: ENet would pack small ones into one UDP
  // datagram, and a set lost in one datagram with its parity cannot be rebuilt.
  std::map<size_t, std::vector<size_t>> by_size;
  for (size_t i = 0; i < messages.size(); ++i) by_size[messages[i].size()].push_back(i);
  uint32_t set = 0;
  for (const auto& [size, index] : by_size) {
    const size_t n = index.size(), sets = (n + size_t(fec_k) - 1) / size_t(fec_k);
    for (size_t s = 0; s < sets; ++s) {
      std::vector<std::span<const uint8_t>> members;
      for (size_t i = s * n / sets; i < (s + 1) * n / sets; ++i) {
        members.emplace_back(messages[index[i]]);
        sent += transport.send(peer, messages[index[i]], delivery) ? 1 : 0;
        transport.flush();
      }
      if (set <= 65535) transport.send(peer, make_parity(uint16_t(set++), members), Delivery::unreliable);
      transport.flush();
    }
  }
  transport.flush();
  return sent;
}

namespace {

// A parity message of the exchange being gathered (GatherSpec::fec), kept until its set is
// settled: every member arrived, or the one missing was rebuilt.
struct ParitySet {
  int32_t peer = -1;
  uint16_t id = 0;
  uint16_t rows = 0;
  std::vector<ParityMember> members;
  std::vector<uint16_t> bits;  // XOR of the members' float16 payloads
};

inline constexpr size_t kMaxParitySets = 4096;  // per gather, besides the byte budget

}  // namespace

GatherResult gather(Transport& transport, const GatherSpec& spec, float* out) {
  constexpr const char* fn = "edge.gather";
  const size_t groups = spec.peer_of_group.size();
  require(spec.critical.size() == groups, fn, "critical has ", spec.critical.size(), " entries for ", groups,
          " groups");
  require(spec.rows > 0 && spec.rows <= 65535 && spec.cols > 0 && spec.cols <= 65535, fn, "bad shape ", spec.rows,
          " x ", spec.cols);
  require(spec.hard_deadline >= spec.deadline, fn, "hard_deadline must not precede deadline");
  int32_t max_peer = -1;
  for (int32_t p : spec.peer_of_group) max_peer = std::max(max_peer, p);
  GatherResult r;
  r.received.assign(groups * spec.rows, 0);
  r.peer_last.assign(size_t(max_peer + 1), -1.0);
  r.peer_heard.assign(size_t(max_peer + 1), -1.0);
  r.peer_missing.assign(size_t(max_peer + 1), 0);
  const size_t row_values = size_t(spec.cols);
  // fec: the float16 bits of every row that arrived (what parity is computed over), and the
  // parity sets not settled yet, together at most as many bytes as the exchange's terms.
  std::vector<uint16_t> raw;
  std::vector<ParitySet> sets;
  std::vector<std::pair<int32_t, uint16_t>> set_ids;  // (peer, id) of every parity kept
  size_t parity_bytes = 0;
  const size_t parity_budget = groups * spec.rows * row_values * 2;
  if (spec.fec) {
    raw.assign(groups * spec.rows * row_values, 0);
    r.rebuilt.assign(groups * spec.rows, 0);
  }
  int64_t left_all = 0, left_critical = 0;
  for (size_t g = 0; g < groups; ++g) {
    if (spec.peer_of_group[g] < 0) continue;
    left_all += spec.rows;
    if (spec.critical[g]) left_critical += spec.rows;
    r.peer_missing[spec.peer_of_group[g]] += spec.rows;
  }
  auto arrived = [&](size_t g, int32_t row) {
    r.received[g * spec.rows + row] = 1;
    --left_all;
    if (spec.critical[g]) --left_critical;
    --r.peer_missing[spec.peer_of_group[g]];
  };
  // A peer that drops out during the wait: stop waiting for its rows.
  auto forget_peer = [&](int32_t peer) {
    for (size_t g = 0; g < groups; ++g) {
      if (spec.peer_of_group[g] != peer) continue;
      for (int32_t row = 0; row < spec.rows; ++row) {
        if (r.received[g * spec.rows + row]) continue;
        r.received[g * spec.rows + row] = 2;  // 2: will not come (cleared below)
        --left_all;
        if (spec.critical[g]) --left_critical;
      }
    }
  };
  // True once nothing more can come of set `s`: all its members arrived, or the only one
  // missing was rebuilt (its parity XOR the others' bits). Two or more missing: keep waiting.
  auto settle = [&](const ParitySet& s, double time) {
    int missing = -1;
    for (size_t i = 0; i < s.members.size(); ++i) {
      const uint8_t* mask = r.received.data() + size_t(s.members[i].group) * spec.rows + s.members[i].row0;
      if (std::all_of(mask, mask + s.rows, [](uint8_t m) { return m == 1; })) continue;
      if (missing >= 0) return false;
      missing = int(i);
    }
    if (missing < 0) return true;
    std::vector<uint16_t> bits = s.bits;
    for (size_t i = 0; i < s.members.size(); ++i) {
      if (int(i) == missing) continue;
      const uint16_t* other = raw.data() + (size_t(s.members[i].group) * spec.rows + s.members[i].row0) * row_values;
      for (size_t v = 0; v < bits.size(); ++v) bits[v] ^= other[v];
    }
    const ParityMember m = s.members[missing];
    for (int32_t j = 0; j < s.rows; ++j) {
      const size_t row = size_t(m.group) * spec.rows + m.row0 + j;
      if (r.received[row] != 0) continue;  // arrived (or its peer is gone)
      for (size_t v = 0; v < row_values; ++v) {
        raw[row * row_values + v] = bits[j * row_values + v];
        out[row * row_values + v] = f16_to_float(bits[j * row_values + v]);
      }
      arrived(m.group, m.row0 + j);
      r.rebuilt[row] = 1;
    }
    r.peer_last[s.peer] = time;
    return true;
  };
  // Checks a parity message of this exchange against the spec and keeps it; false: refused.
  auto keep_parity = [&](const Header& h, const Event& e) {
    if (e.peer < 0 || e.peer > max_peer || h.cols != spec.cols || h.rows > spec.rows) return false;
    const std::vector<ParityMember> members = parity_members(h, e.data);
    for (size_t i = 0; i < members.size(); ++i) {
      const ParityMember& m = members[i];
      if (m.group >= groups || spec.peer_of_group[m.group] != e.peer || size_t(m.row0) + h.rows > size_t(spec.rows))
        return false;
      for (size_t j = 0; j < i; ++j)  // members cover disjoint rows
        if (members[j].group == m.group && std::abs(int32_t(members[j].row0) - int32_t(m.row0)) < h.rows)
          return false;
    }
    const std::pair<int32_t, uint16_t> id{e.peer, h.group};
    if (std::find(set_ids.begin(), set_ids.end(), id) != set_ids.end()) return false;
    const std::span<const uint8_t> payload = payload_bytes(h, e.data);
    if (set_ids.size() >= kMaxParitySets || parity_bytes + payload.size() > parity_budget) return false;
    set_ids.push_back(id);
    parity_bytes += payload.size();
    ParitySet s{e.peer, h.group, h.rows, members, std::vector<uint16_t>(payload.size() / 2)};
    for (size_t v = 0; v < s.bits.size(); ++v) s.bits[v] = uint16_t(payload[2 * v] | (payload[2 * v + 1] << 8));
    if (!settle(s, e.time)) sets.push_back(std::move(s));
    return true;
  };
  while (true) {
    const double t = now();
    if (left_all == 0) {
      r.end = GatherResult::End::complete;
      break;
    }
    if (t >= spec.hard_deadline) {
      r.end = GatherResult::End::hard_deadline;
      break;
    }
    const bool only_extras = !spec.wait_all && left_critical == 0;
    if (only_extras && t >= spec.deadline) {
      r.end = GatherResult::End::deadline;
      break;
    }
    Event e = transport.poll((only_extras ? spec.deadline : spec.hard_deadline) - t);
    if (e.type == Event::Type::none) continue;
    if (e.type == Event::Type::disconnect) {
      if (e.peer >= 0 && e.peer <= max_peer) forget_peer(e.peer);
      r.other.push_back(std::move(e));
      continue;
    }
    if (e.type != Event::Type::message) {
      r.other.push_back(std::move(e));
      continue;
    }
    Header h;
    try {
      h = decode_header(e.data, fn);
    } catch (const FormatError&) {
      ++r.malformed;
      continue;
    }
    if (h.version != kWireVersion || (h.kind != Kind::partial && h.kind != Kind::parity)) {
      r.other.push_back(std::move(e));
      continue;
    }
    // Any partial, late, duplicated or current, shows the peer is alive and computing.
    if (e.peer >= 0 && e.peer <= max_peer) r.peer_heard[e.peer] = e.time;
    if (h.step != spec.step || h.layer != spec.layer || h.part != spec.part) {
      ++r.stale;
      if (h.kind == Kind::partial && h.row0 == 0 && !(h.flags & kFlagDuplicate) && r.late.size() < 4096)
        r.late.push_back(LateArrival{h.step, h.group, e.peer, e.time});
      continue;
    }
    if (h.kind == Kind::parity) {
      if (!spec.fec) continue;  // not asked for: ignored
      if (keep_parity(h, e))
        ++r.parity;
      else
        ++r.parity_refused;
      continue;
    }
    if (h.group >= groups || spec.peer_of_group[h.group] != e.peer || h.cols != spec.cols ||
        size_t(h.row0) + h.rows > size_t(spec.rows)) {
      ++r.malformed;
      continue;
    }
    uint8_t* mask = r.received.data() + size_t(h.group) * spec.rows + h.row0;
    bool fresh = false;
    for (int32_t i = 0; i < h.rows; ++i) fresh |= mask[i] == 0;
    if (!fresh) {
      r.duplicates += h.rows;
      continue;
    }
    const size_t at = (size_t(h.group) * spec.rows + h.row0) * row_values;
    payload_to_float(h, e.data, out + at);
    if (spec.fec) {
      const std::span<const uint8_t> p = payload_bytes(h, e.data);
      for (size_t v = 0; v < p.size() / 2; ++v) raw[at + v] = uint16_t(p[2 * v] | (p[2 * v + 1] << 8));
    }
    for (int32_t i = 0; i < h.rows; ++i)
      if (mask[i] == 0) arrived(h.group, h.row0 + i);
    r.peer_last[e.peer] = e.time;
    if (!sets.empty())
      std::erase_if(sets, [&](const ParitySet& s) { return s.peer == e.peer && settle(s, e.time); });
  }
  for (uint8_t& m : r.received) m = m == 1;
  r.end_time = now();
  return r;
}

}  // namespace halo::edge
