// Replay, reordering and tampering of sealed ENet datagrams over real loopback sockets:
// a UDP proxy between root and worker holds, re-sends and alters datagrams. ENet drops
// a re-sent unsequenced datagram itself (its own 1024-group window), which would hide
// ours, so the proxy gives each replay an unused ENet group (and renumbers the root's
// later datagrams past it): only the link's replay window stands between the attacker
// and the worker.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "halo/edge/link.hpp"
#include "halo/edge/transport.hpp"

extern "C" size_t enet_protocol_command_size(uint8_t);

using namespace halo::edge;

namespace {

int udp_socket(uint16_t port) {
  const int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  return fd;
}

uint16_t port_of(int fd) {
  sockaddr_in a{};
  socklen_t n = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &n);
  return ntohs(a.sin_port);
}

// Where in an ENet datagram the (first) unsequenced send command's group field is, if any.
std::optional<size_t> unsequenced_group_at(const std::vector<uint8_t>& d) {
  if (d.size() < 2) return std::nullopt;
  const uint16_t peer = uint16_t(d[0] << 8 | d[1]);
  size_t at = (peer & 0x8000) ? 4 : 2;  // sent-time flag
  while (at + 4 <= d.size()) {
    const uint8_t command = d[at] & 0x0F;
    const size_t size = enet_protocol_command_size(command);
    if (size == 0 || at + size > d.size()) return std::nullopt;
    size_t data = 0;
    if (command == 6) data = size_t(d[at + 4] << 8 | d[at + 5]);                      // send reliable
    if (command == 7 || command == 9) data = size_t(d[at + 6] << 8 | d[at + 7]);      // unreliable, unsequenced
    if (command == 8 || command == 12) data = size_t(d[at + 6] << 8 | d[at + 7]);     // fragments
    if (command == 9) return at + 4;
    at += size + data;
  }
  return std::nullopt;
}

// Root <-> proxy <-> worker, each turned by its own thread (the root's is the test's).
// Datagrams root -> worker carrying an unsequenced send are recorded (`seen`) and, while
// `hold` is set, kept back (`held`) instead of forwarded.
class Proxy {
 public:
  explicit Proxy(uint16_t worker_port) : front_(udp_socket(0)), back_(udp_socket(0)) {
    worker_.sin_family = AF_INET;
    worker_.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    worker_.sin_port = htons(worker_port);
    thread_ = std::thread([this] {
      while (!stop_) {
        pollfd fds[2] = {{front_, POLLIN, 0}, {back_, POLLIN, 0}};
        ::poll(fds, 2, 5);
        std::lock_guard lock(mutex_);
        pump();
      }
    });
  }
  ~Proxy() {
    stop_ = true;
    thread_.join();
    close(front_);
    close(back_);
  }
  uint16_t port() const { return port_of(front_); }
  void hold(bool on) {
    std::lock_guard lock(mutex_);
    hold_ = on;
  }
  std::vector<std::vector<uint8_t>> held() {
    std::lock_guard lock(mutex_);
    return held_;
  }
  std::vector<std::vector<uint8_t>> seen() {
    std::lock_guard lock(mutex_);
    return seen_;
  }
  void forward(const std::vector<uint8_t>& d) {
    std::lock_guard lock(mutex_);
    send_to_worker(d);
  }
  // Re-sends a datagram under an ENet group ENet has not seen yet, so ENet passes it on.
  void replay(std::vector<uint8_t> d) {
    std::lock_guard lock(mutex_);
    const auto at = unsequenced_group_at(d);
    REQUIRE(at);
    ++last_group_;
    ++shift_;  // the root's own next datagrams are renumbered past it
    d[*at] = uint8_t(last_group_ >> 8);
    d[*at + 1] = uint8_t(last_group_);
    send_to_worker(d);
  }

 private:
  void send_to_worker(const std::vector<uint8_t>& d) {
    sendto(back_, d.data(), d.size(), 0, reinterpret_cast<const sockaddr*>(&worker_), sizeof worker_);
  }
  void pump() {
    uint8_t buffer[8192];
    while (true) {
      sockaddr_in from{};
      socklen_t n = sizeof from;
      const ssize_t got = recvfrom(front_, buffer, sizeof buffer, 0, reinterpret_cast<sockaddr*>(&from), &n);
      if (got < 0) break;
      root_ = from;
      std::vector<uint8_t> d(buffer, buffer + got);
      if (auto at = unsequenced_group_at(d)) {
        last_group_ = uint16_t((d[*at] << 8 | d[*at + 1]) + shift_);
        d[*at] = uint8_t(last_group_ >> 8);
        d[*at + 1] = uint8_t(last_group_);
        seen_.push_back(d);
        if (hold_) {
          held_.push_back(d);
          continue;
        }
      }
      send_to_worker(d);
    }
    while (true) {
      const ssize_t got = recv(back_, buffer, sizeof buffer, 0);
      if (got < 0) break;
      sendto(front_, buffer, size_t(got), 0, reinterpret_cast<const sockaddr*>(&root_), sizeof root_);
    }
  }
  int front_, back_;
  sockaddr_in root_{}, worker_{};
  bool hold_ = false;
  std::vector<std::vector<uint8_t>> held_, seen_;
  uint16_t last_group_ = 0, shift_ = 0;
  std::mutex mutex_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// A worker transport on its own thread, collecting the messages it receives.
class Worker {
 public:
  explicit Worker(const TransportOptions& o) : t_(Transport::create(Protocol::enet, "127.0.0.1", 0, 4, o)) {
    thread_ = std::thread([this] {
      while (!stop_) {
        Event e = t_->poll(0.005);
        std::lock_guard lock(mutex_);
        if (e.type == Event::Type::message) inbox_.emplace_back(e.data.begin(), e.data.end());
        failures_ = t_->auth_failures();
      }
    });
  }
  ~Worker() {
    stop_ = true;
    thread_.join();
  }
  uint16_t port() const { return t_->port(); }
  // Waits until `n` messages arrived or `seconds` passed; returns the inbox.
  std::vector<std::string> inbox(size_t n, double seconds = 1.0) {
    const double end = now() + seconds;
    while (true) {
      {
        std::lock_guard lock(mutex_);
        if (inbox_.size() >= n || now() >= end) return inbox_;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  uint64_t failures() {
    std::lock_guard lock(mutex_);
    return failures_;
  }

 private:
  std::unique_ptr<Transport> t_;
  std::vector<std::string> inbox_;
  uint64_t failures_ = 0;
  std::mutex mutex_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

void send(Transport& t, int32_t peer, const std::string& text, Delivery d) {
  REQUIRE(t.send(peer, {reinterpret_cast<const uint8_t*>(text.data()), text.size()}, d));
  t.flush();
}

// Lets the root's ENet answer acknowledgements for a while.
void turn(Transport& t, double seconds) {
  const double end = now() + seconds;
  while (now() < end) t.poll(0.002);
}

size_t count(const std::vector<std::string>& v, const std::string& s) { return size_t(std::count(v.begin(), v.end(), s)); }

}  // namespace

TEST_CASE("over enet, a held-back datagram is accepted once; replayed, too old or tampered ones are refused") {
  TransportOptions o;
  o.key = keygen();
  Worker worker(o);
  Proxy proxy(worker.port());
  auto root = Transport::create(Protocol::enet, "", 0, 2, o);
  const int32_t peer = root->connect("127.0.0.1", proxy.port(), 5.0);

  // Reordered: "a" is held back while "b" and "c" pass, then arrives late: accepted once.
  proxy.hold(true);
  send(*root, peer, "a", Delivery::unreliable);
  turn(*root, 0.05);
  proxy.hold(false);
  REQUIRE(proxy.held().size() == 1);
  send(*root, peer, "b", Delivery::unreliable);
  send(*root, peer, "c", Delivery::unreliable);
  REQUIRE(worker.inbox(2).size() == 2);
  proxy.forward(proxy.held()[0]);
  auto inbox = worker.inbox(3);
  REQUIRE(inbox == std::vector<std::string>{"b", "c", "a"});
  REQUIRE(worker.failures() == 0);

  // Replayed (under fresh ENet groups): refused by the link, counted.
  for (const auto& d : proxy.seen()) proxy.replay(d);
  turn(*root, 0.2);
  REQUIRE(worker.inbox(4, 0.2).size() == 3);
  REQUIRE(worker.failures() == 3);

  // Tampered: "d" is held back; copies with one ciphertext byte or one tag byte flipped
  // are refused, and do not use up its counter: the genuine one still counts.
  proxy.hold(true);
  send(*root, peer, "d", Delivery::unreliable);
  turn(*root, 0.05);
  proxy.hold(false);
  const auto d = proxy.held().back();
  auto in_text = d, in_tag = d;
  in_text[d.size() - 17] ^= 0x20;  // "d" -> "D" if it were not checked
  in_tag.back() ^= 0x01;
  proxy.replay(in_text);
  proxy.replay(in_tag);
  turn(*root, 0.2);
  REQUIRE(worker.inbox(4, 0.2).size() == 3);
  REQUIRE(worker.failures() == 5);
  proxy.replay(d);
  inbox = worker.inbox(4);
  REQUIRE(inbox.size() == 4);
  REQUIRE(inbox.back() == "d");

  // Too old: 1100 later messages move the window past "e" before it arrives.
  proxy.hold(true);
  send(*root, peer, "e", Delivery::unreliable);
  turn(*root, 0.05);
  proxy.hold(false);
  const auto e = proxy.held().back();
  // The one 1024 after "e" (same window slot) is lost, so only the age can refuse "e".
  for (int i = 0; i < 1100; ++i) {
    if (i == 1023) proxy.hold(true);
    send(*root, peer, "x", Delivery::unreliable);
    if (i == 1023) turn(*root, 0.02), proxy.hold(false);
    if (i % 20 == 0) turn(*root, 0.005);  // paced: the loopback socket must not drop them
  }
  // Unreliable: a loaded machine may lose a few, which only leaves more holes in the window.
  inbox = worker.inbox(4 + 1099, 5.0);
  const size_t arrived = inbox.size();
  REQUIRE(count(inbox, "x") > 1030);
  REQUIRE(proxy.seen().size() >= 4 + 1 + 1100);  // the newest counter passed the proxy
  proxy.replay(e);  // its original ENet group is long gone from ENet's window as well
  turn(*root, 0.2);
  inbox = worker.inbox(arrived + 1, 0.3);
  REQUIRE(count(inbox, "e") == 0);
  REQUIRE(worker.failures() == 6);

  // The legitimate root is still served.
  send(*root, peer, "still here", Delivery::control);
  REQUIRE(count(worker.inbox(arrived + 1), "still here") == 1);
}
