#include <catch2/catch.hpp>

#include <atomic>
#include <string>
#include <thread>

#include "halo/edge/exchange.hpp"
#include "halo/edge/transport.hpp"

using namespace halo::edge;

namespace {

std::span<const uint8_t> bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

Event wait_for(Transport& t, Event::Type type, double timeout = 5.0) {
  const double end = now() + timeout;
  while (now() < end) {
    Event e = t.poll(end - now());
    if (e.type == type) return e;
  }
  return Event{};
}

}  // namespace

TEST_CASE("both transports carry messages both ways on loopback and report a closed peer") {
  for (Protocol protocol : {Protocol::enet, Protocol::tcp}) {
    auto server = Transport::create(protocol, "127.0.0.1", 0, 4);
    REQUIRE(server->port() != 0);
    std::atomic<bool> done{false};
    std::string echoed;
    std::thread worker([&] {
      // Echo every message back with the same delivery, until the peer leaves.
      while (!done) {
        Event e = server->poll(0.05);
        if (e.type == Event::Type::message) server->send(e.peer, e.data, Delivery::reliable);
        if (e.type == Event::Type::disconnect) done = true;
      }
    });
    {
      auto client = Transport::create(protocol, "", 0, 2);
      const int32_t peer = client->connect("127.0.0.1", server->port(), 3.0);
      REQUIRE(client->connected(peer));
      std::string big(100000, 'x');  // several datagrams: enet fragments reliable messages
      for (const std::string& text : {std::string("hello"), big}) {
        REQUIRE(client->send(peer, bytes(text), Delivery::control));
        client->flush();
        Event e = wait_for(*client, Event::Type::message);
        REQUIRE(e.type == Event::Type::message);
        REQUIRE(std::string(e.data.begin(), e.data.end()) == text);
      }
      client->disconnect(peer, true);
      REQUIRE_FALSE(client->send(peer, bytes("late"), Delivery::control));
    }
    const double end = now() + 5;
    while (!done && now() < end) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    done = true;
    worker.join();
  }
}

TEST_CASE("connecting to nobody fails with a message naming the address, within the timeout") {
  // A bound but unserviced socket on a known port: udp gets no answer, tcp gets a refusal.
  auto mute = Transport::create(Protocol::enet, "127.0.0.1", 0, 1);
  auto client = Transport::create(Protocol::enet, "", 0, 1);
  const double t0 = now();
  REQUIRE_THROWS_WITH(client->connect("127.0.0.1", mute->port(), 0.3),
                      Catch::Contains("no answer from udp 127.0.0.1:" + std::to_string(mute->port())));
  REQUIRE(now() - t0 < 2.0);
  auto tcp = Transport::create(Protocol::tcp, "", 0, 1);
  auto listener = Transport::create(Protocol::tcp, "127.0.0.1", 0, 1);
  const uint16_t port = listener->port();
  listener.reset();  // nothing listens there now
  REQUIRE_THROWS_WITH(tcp->connect("127.0.0.1", port, 1.0), Catch::Contains("tcp 127.0.0.1:"));
  REQUIRE_THROWS_WITH(Transport::create(Protocol::tcp, "not-an-ip", 0, 1), Catch::Contains("numeric IPv4"));
}

TEST_CASE("gather keeps what arrived by the deadline and waits for critical groups") {
  for (Protocol protocol : {Protocol::enet, Protocol::tcp}) {
    auto server = Transport::create(protocol, "127.0.0.1", 0, 2);
    auto root = Transport::create(protocol, "", 0, 2);
    std::atomic<int> stage{0};
    constexpr int rows = 3, cols = 600;  // a row fills most of a datagram: one message per row on enet
    std::thread worker([&] {
      int32_t peer = -1;
      const double end = now() + 10;
      while (now() < end && stage < 3) {
        Event e = server->poll(0.01);
        if (e.type == Event::Type::connect) peer = e.peer;
        if (e.type != Event::Type::message) continue;
        const Header in = decode_header(e.data);
        // Group g's rows are all g + row / 8; group 2 never answers; group 1 answers late.
        for (uint16_t g : {0, 1}) {
          std::vector<float> values(rows * cols);
          for (int r = 0; r < rows; ++r)
            for (int c = 0; c < cols; ++c) values[r * cols + c] = float(g) + float(r) / 8.0f;
          Header h;
          h.step = in.step;
          h.layer = in.layer;
          h.part = in.part;
          h.group = g;
          h.cols = cols;
          if (g == 1) std::this_thread::sleep_for(std::chrono::milliseconds(in.pos));
          send_partial(*server, peer, h, values.data(), rows, g == 0 ? Delivery::reliable : Delivery::unreliable,
                       g == 0);
        }
        ++stage;
      }
      (void)peer;
    });
    const int32_t peer = root->connect("127.0.0.1", server->port(), 3.0);
    auto ask = [&](uint32_t step, uint32_t delay_ms, bool wait_all, std::vector<uint8_t> critical, double deadline_s,
                   double hard_s) {
      Header h;
      h.step = step;
      h.pos = delay_ms;
      h.rows = 1;
      h.cols = 1;
      const float x = 0;
      REQUIRE(send_input(*root, peer, h, {}, &x, Delivery::control));
      GatherSpec spec;
      spec.step = step;
      spec.rows = rows;
      spec.cols = cols;
      spec.peer_of_group = {peer, peer, peer};
      spec.critical = critical;
      spec.deadline = now() + deadline_s;
      spec.hard_deadline = now() + hard_s;
      spec.wait_all = wait_all;
      std::vector<float> out(3 * rows * cols, -1.0f);
      GatherResult r = gather(*root, spec, out.data());
      for (int g = 0; g < 2; ++g)
        for (int row = 0; row < rows; ++row)
          if (r.received[g * rows + row]) REQUIRE(out[(g * rows + row) * cols + 7] == float(g) + float(row) / 8.0f);
      for (int row = 0; row < rows; ++row) REQUIRE(r.received[2 * rows + row] == 0);
      REQUIRE(out[2 * rows * cols] == -1.0f);  // rows that never came are left alone
      return r;
    };
    // Group 1 comes 300 ms late; the deadline (100 ms) passes first: its rows are dropped.
    GatherResult a = ask(1, 300, false, {1, 0, 0}, 0.1, 3.0);
    REQUIRE(a.end == GatherResult::End::deadline);
    REQUIRE(a.received[0] == 1);
    REQUIRE(a.received[rows] == 0);
    REQUIRE(a.peer_missing[peer] == 2 * rows);
    // A critical group that never comes: gather gives up at the hard deadline, not before.
    const double t0 = now();
    GatherResult b = ask(2, 0, false, {1, 0, 1}, 0.05, 0.4);
    REQUIRE(b.end == GatherResult::End::hard_deadline);
    REQUIRE(now() - t0 >= 0.39);
    REQUIRE(b.stale >= 0);
    // wait_all waits for late rows; the late group of step 1 arrives meanwhile and is counted stale.
    GatherResult c = ask(3, 0, true, {0, 0, 0}, 0.0, 0.5);
    REQUIRE(c.end == GatherResult::End::hard_deadline);
    REQUIRE(c.received[0] == 1);
    stage = 3;
    worker.join();
  }
}

TEST_CASE("a peer that disconnects mid-gather leaves its missing rows not received, the others' kept") {
  for (Protocol protocol : {Protocol::enet, Protocol::tcp}) {
    constexpr int rows = 3, cols = 600;
    // Two workers: `steady` answers its group whole; `quitter` sends the first row of its
    // group, then closes the connection while the root is still gathering.
    auto steady = Transport::create(protocol, "127.0.0.1", 0, 2);
    auto quitter = Transport::create(protocol, "127.0.0.1", 0, 2);
    std::atomic<bool> stop{false};
    auto serve = [&](Transport& server, uint16_t group, int32_t answer_rows, bool quit) {
      int32_t peer = -1;
      bool answered = false;
      const double end = now() + 10;
      while (!stop && now() < end) {
        Event e = server.poll(0.01);
        if (e.type == Event::Type::connect) peer = e.peer;
        if (e.type != Event::Type::message || answered) continue;
        const Header in = decode_header(e.data);
        std::vector<float> values(rows * cols);
        for (int r = 0; r < rows; ++r)
          for (int c = 0; c < cols; ++c) values[r * cols + c] = float(group) + float(r) / 8.0f;
        Header h;
        h.step = in.step;
        h.group = group;
        h.cols = cols;
        send_partial(server, peer, h, values.data(), answer_rows, Delivery::reliable, false);
        if (quit) server.disconnect(peer, false);  // after what is queued went out
        answered = true;
      }
    };
    struct Joined {  // a failed REQUIRE below still stops and joins the workers
      std::atomic<bool>& stop;
      std::thread a, b;
      ~Joined() {
        stop = true;
        a.join();
        b.join();
      }
    } workers{stop, std::thread([&] { serve(*steady, 0, rows, false); }),
              std::thread([&] { serve(*quitter, 1, 1, true); })};
    auto root = Transport::create(protocol, "", 0, 2);
    const int32_t pa = root->connect("127.0.0.1", steady->port(), 3.0);
    const int32_t pb = root->connect("127.0.0.1", quitter->port(), 3.0);
    Header h;
    h.step = 7;
    h.rows = 1;
    h.cols = 1;
    const float x = 0;
    REQUIRE(send_input(*root, pa, h, {}, &x, Delivery::control));
    REQUIRE(send_input(*root, pb, h, {}, &x, Delivery::control));
    GatherSpec spec;
    spec.step = 7;
    spec.rows = rows;
    spec.cols = cols;
    spec.peer_of_group = {pa, pb};
    spec.critical = {1, 1};  // both critical: only the disconnect can end the wait early
    spec.deadline = now() + 5.0;
    spec.hard_deadline = now() + 5.0;
    spec.wait_all = true;
    std::vector<float> out(2 * rows * cols, -1.0f);
    const double t0 = now();
    const GatherResult r = gather(*root, spec, out.data());
    CAPTURE(protocol == Protocol::enet ? "enet" : "tcp");
    REQUIRE(r.end == GatherResult::End::complete);  // nothing left to wait for
    REQUIRE(now() - t0 < 4.0);
    REQUIRE(r.received == std::vector<uint8_t>{1, 1, 1, 1, 0, 0});
    for (int row = 0; row < rows; ++row) REQUIRE(out[size_t(row) * cols + 5] == float(row) / 8.0f);
    REQUIRE(out[size_t(rows) * cols + 5] == 1.0f);
    for (int row = 1; row < rows; ++row) REQUIRE(out[size_t(rows + row) * cols + 5] == -1.0f);
    REQUIRE(r.peer_missing[size_t(pa)] == 0);
    REQUIRE(r.peer_missing[size_t(pb)] == rows - 1);
    bool saw_disconnect = false;
    for (const Event& e : r.other) saw_disconnect |= e.type == Event::Type::disconnect && e.peer == pb;
    REQUIRE(saw_disconnect);
  }
}

TEST_CASE("gather rebuilds the one lost partial of a parity set and refuses parity that does not fit") {
  auto server = Transport::create(Protocol::enet, "127.0.0.1", 0, 2);
  auto root = Transport::create(Protocol::enet, "", 0, 2);
  constexpr int rows = 2, cols = 300;  // one row per message
  auto partial = [&](uint16_t group, uint16_t row0, uint16_t n, uint16_t width, float base) {
    std::vector<float> values(size_t(n) * width);
    for (size_t i = 0; i < values.size(); ++i) values[i] = base + float(i % 97) / 64.0f;
    Header h;
    h.step = 9;
    h.group = group;
    h.row0 = row0;
    h.rows = n;
    h.cols = width;
    return make_partial(h, values.data());
  };
  using Set = std::vector<std::span<const uint8_t>>;
  std::vector<std::vector<uint8_t>> members;  // groups 0..2, rows 0 and 1 each
  for (uint16_t g = 0; g < 3; ++g)
    for (uint16_t r = 0; r < rows; ++r) members.push_back(partial(g, r, 1, cols, float(g * 10 + r)));
  std::vector<std::vector<uint8_t>> sent;
  // Set 0: row 0 of every group, group 1's lost. Set 1: row 1 of groups 0 and 1, both lost.
  sent.push_back(members[0]);
  sent.push_back(members[4]);
  sent.push_back(make_parity(0, Set{members[0], members[2], members[4]}));
  sent.push_back(make_parity(1, Set{members[1], members[3]}));
  sent.push_back(members[5]);
  // Hostile: a huge member count, a repeated set id, a group that is not this peer's (7),
  // rows past the term, another width, overlapping members.
  auto huge = make_parity(2, Set{members[5]});
  huge[28] = huge[29] = huge[30] = huge[31] = 0xFF;
  sent.push_back(huge);
  sent.push_back(make_parity(0, Set{members[5]}));
  const auto foreign = partial(7, 0, 1, cols, 0), past = partial(2, 2, 1, cols, 0), wide = partial(2, 0, 1, 301, 0);
  const auto a = partial(2, 0, 2, cols, 0), b = partial(2, 1, 2, cols, 0);
  sent.push_back(make_parity(3, Set{foreign}));
  sent.push_back(make_parity(4, Set{past}));
  sent.push_back(make_parity(5, Set{wide}));
  sent.push_back(make_parity(6, Set{a, b}));
  std::thread worker([&] {
    const Event c = wait_for(*server, Event::Type::connect);
    for (const auto& m : sent) {
      server->send(c.peer, m, Delivery::unreliable);
      server->flush();
    }
    wait_for(*server, Event::Type::disconnect, 3.0);
  });
  const int32_t peer = root->connect("127.0.0.1", server->port(), 3.0);
  GatherSpec spec;
  spec.step = 9;
  spec.rows = rows;
  spec.cols = cols;
  spec.peer_of_group = {peer, peer, peer};
  spec.critical = {0, 0, 0};
  spec.deadline = spec.hard_deadline = now() + 1.0;
  spec.fec = true;
  std::vector<float> out(3 * rows * cols, -1.0f);
  const GatherResult r = gather(*root, spec, out.data());
  REQUIRE(r.received == std::vector<uint8_t>{1, 0, 1, 0, 1, 1});
  REQUIRE(r.rebuilt == std::vector<uint8_t>{0, 0, 1, 0, 0, 0});
  REQUIRE(r.parity == 2);
  REQUIRE(r.malformed == 1);
  REQUIRE(r.parity_refused == 5);
  for (int v = 0; v < cols; ++v) REQUIRE(out[2 * cols + v] == 10.0f + float(v % 97) / 64.0f);  // group 1, row 0
  REQUIRE(out[3 * cols] == -1.0f);  // group 1, row 1: two lost in its set, left alone
  root->disconnect(peer, true);
  worker.join();
}
