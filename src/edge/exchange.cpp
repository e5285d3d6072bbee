#include "halo/edge/exchange.hpp"

#include <algorithm>

#include "halo/core/error.hpp"

namespace halo::edge {

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
  const size_t room = transport.datagram_payload() > kHeaderBytes ? transport.datagram_payload() - kHeaderBytes : 0;
  const int32_t per_message = int32_t(std::clamp<size_t>(room / (2 * size_t(header.cols)), 1, 65535));
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
  int64_t left_all = 0, left_critical = 0;
  for (size_t g = 0; g < groups; ++g) {
    if (spec.peer_of_group[g] < 0) continue;
    left_all += spec.rows;
    if (spec.critical[g]) left_critical += spec.rows;
    r.peer_missing[spec.peer_of_group[g]] += spec.rows;
  }
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
    if (h.version != kWireVersion || h.kind != Kind::partial) {
      r.other.push_back(std::move(e));
      continue;
    }
    // Any partial, late, duplicated or current, shows the peer is alive and computing.
    if (e.peer >= 0 && e.peer <= max_peer) r.peer_heard[e.peer] = e.time;
    if (h.step != spec.step || h.layer != spec.layer || h.part != spec.part) {
      ++r.stale;
      if (h.row0 == 0 && !(h.flags & kFlagDuplicate) && r.late.size() < 4096)
        r.late.push_back(LateArrival{h.step, h.group, e.peer, e.time});
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
    payload_to_float(h, e.data, out + (size_t(h.group) * spec.rows + h.row0) * spec.cols);
    for (int32_t i = 0; i < h.rows; ++i) {
      if (mask[i] != 0) continue;
      mask[i] = 1;
      --left_all;
      if (spec.critical[h.group]) --left_critical;
      --r.peer_missing[e.peer];
    }
    r.peer_last[e.peer] = e.time;
  }
  for (uint8_t& m : r.received) m = m == 1;
  r.end_time = now();
  return r;
}

}  // namespace halo::edge
