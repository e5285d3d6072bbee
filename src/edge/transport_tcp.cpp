// TCP transport: the baseline's wait-for-all links, as distributed-llama and
// llama.cpp's RPC use them (TCP_NODELAY, the kernel's loss recovery). Frames
// are a 4-byte little-endian length and the message (sealed: the AEAD frame).
// With a key, an accepted connection stays in `handshakes_` (no peer id, frames of
// at most kHandshakeMaxBytes) until it proved the key; any refused frame closes it,
// since a stream that carried one forged byte cannot be trusted to resynchronise.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <memory>
#include <stdexcept>

#include "halo/core/error.hpp"
#include "halo/edge/link.hpp"
#include "src/edge/transports.hpp"

namespace halo::edge {

namespace {

constexpr size_t kMaxQueued = size_t(1) << 28;  // unsent bytes before a peer counts as gone

std::string errno_text() { return std::strerror(errno); }

void set_nonblocking(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK); }

void set_nodelay(int fd) {
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

timespec to_timespec(double seconds) {
  const double s = std::max(0.0, seconds);
  return timespec{time_t(s), long((s - double(time_t(s))) * 1e9)};
}

sockaddr_in resolve(const std::string& host, uint16_t port, const char* fn) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0 || found == nullptr)
    throw std::runtime_error(std::string("[") + fn + "] cannot resolve tcp " + host + ":" + std::to_string(port));
  sockaddr_in out = *reinterpret_cast<sockaddr_in*>(found->ai_addr);
  freeaddrinfo(found);
  out.sin_port = htons(port);
  return out;
}

struct Conn {
  int fd = -1;
  std::vector<uint8_t> in, out;
  size_t out_sent = 0;
  std::unique_ptr<SecureLink> link;  // null: insecure
  double deadline = 0;               // of the handshake
};

enum class Io { ok, closed };
enum class Frames { done, stopped, bad };

class TcpTransport final : public Transport {
 public:
  TcpTransport(const std::string& bind_host, uint16_t port, int32_t max_peers, const TransportOptions& options)
      : max_peers_(max_peers), options_(options) {
    require(max_peers > 0 && max_peers <= 4095, "edge.Transport", "max_peers must be in [1, 4095], got ", max_peers);
    max_frame_ = options.max_message_bytes + (secure() ? kSealOverhead : 0);
    if (bind_host.empty()) return;
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    require(inet_pton(AF_INET, bind_host.c_str(), &address.sin_addr) == 1, "edge.Transport",
            "listen address must be a numeric IPv4 address, got '", bind_host, "'");
    listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd_ < 0) throw std::runtime_error("[edge.Transport] socket: " + errno_text());
    const int one = 1;
    setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 || listen(listen_fd_, 16) != 0) {
      const std::string why = errno_text();
      close(listen_fd_);
      throw std::runtime_error("[edge.Transport] cannot listen on tcp " + bind_host + ":" + std::to_string(port) +
                               " (" + why + ")");
    }
    set_nonblocking(listen_fd_);
    socklen_t len = sizeof address;
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&address), &len);
    port_ = ntohs(address.sin_port);
  }
  ~TcpTransport() override {
    for (Conn& c : peers_)
      if (c.fd >= 0) close(c.fd);
    for (Conn& c : handshakes_)
      if (c.fd >= 0) close(c.fd);
    if (listen_fd_ >= 0) close(listen_fd_);
  }

  Protocol protocol() const override { return Protocol::tcp; }
  uint16_t port() const override { return port_; }
  uint64_t auth_failures() const override { return auth_failures_; }

  int32_t connect(const std::string& host, uint16_t port, double timeout_s) override {
    const std::string where = "tcp " + host + ":" + std::to_string(port);
    sockaddr_in address = resolve(host, port, "edge.connect");
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw std::runtime_error("[edge.connect] socket: " + errno_text());
    set_nonblocking(fd);
    set_nodelay(fd);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 && errno != EINPROGRESS) {
      const std::string why = errno_text();
      close(fd);
      throw std::runtime_error("[edge.connect] " + where + ": " + why);
    }
    const double deadline = now() + std::max(0.0, timeout_s);
    const std::string late = "[edge.connect] no answer from " + where + " within " + std::to_string(timeout_s) + " s";
    while (true) {
      pollfd p{fd, POLLOUT, 0};
      const timespec ts = to_timespec(deadline - now());
      const int r = ppoll(&p, 1, &ts, nullptr);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        close(fd);
        throw std::runtime_error(late);
      }
      int err = 0;
      socklen_t len = sizeof err;
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        close(fd);
        throw std::runtime_error("[edge.connect] " + where + ": " + std::strerror(err));
      }
      break;
    }
    Conn c;
    c.fd = fd;
    if (secure()) {
      c.link = std::make_unique<SecureLink>(options_.key, SecureLink::Role::client, "edge.connect", options_.aes);
      queue_frame(c, c.link->hello());
      handshake_as_client(c, deadline, where, late);
    }
    const int32_t id = add(std::move(c));
    if (id < 0) throw std::runtime_error("[edge.connect] no free peer slot for " + where);
    if (!peers_[id].in.empty()) parse(id);  // messages that came right behind the handshake
    return id;
  }

  bool send(int32_t peer, std::span<const uint8_t> data, Delivery delivery) override {
    Conn* c = lookup(peer);
    if (c == nullptr) return false;
    require(data.size() <= options_.max_message_bytes, "edge.send", "message of ", data.size(),
            " bytes exceeds max_message_bytes ", options_.max_message_bytes);
    if (c->link) {
      c->link->seal(delivery, data, sealed_);
      queue_frame(*c, sealed_);
    } else {
      queue_frame(*c, data);
    }
    write_some(peer);
    return lookup(peer) != nullptr;
  }

  void flush() override {
    for (size_t i = 0; i < peers_.size(); ++i)
      if (peers_[i].fd >= 0) write_some(int32_t(i));
  }

  Event poll(double timeout_s) override {
    const double deadline = now() + std::max(0.0, timeout_s);
    while (pending_.empty()) {
      // owner: >= 0 a peer, -1 the listening socket, <= -2 handshake -2 - k.
      std::vector<pollfd> fds;
      std::vector<int32_t> owner;
      if (listen_fd_ >= 0) fds.push_back({listen_fd_, POLLIN, 0}), owner.push_back(-1);
      for (size_t i = 0; i < peers_.size(); ++i) {
        if (peers_[i].fd < 0) continue;
        const short events = short(POLLIN | (peers_[i].out.size() > peers_[i].out_sent ? POLLOUT : 0));
        fds.push_back({peers_[i].fd, events, 0});
        owner.push_back(int32_t(i));
      }
      double wake = deadline;
      for (size_t k = 0; k < handshakes_.size(); ++k) {
        fds.push_back({handshakes_[k].fd, POLLIN, 0});
        owner.push_back(-2 - int32_t(k));
        wake = std::min(wake, handshakes_[k].deadline);
      }
      const timespec ts = to_timespec(wake - now());
      const int r = ppoll(fds.data(), fds.size(), &ts, nullptr);
      if (r < 0 && errno != EINTR) throw std::runtime_error("[edge.poll] ppoll: " + errno_text());
      for (size_t k = 0; r > 0 && k < fds.size(); ++k) {
        if (fds[k].revents == 0) continue;
        if (owner[k] == -1) {
          accept_all();
        } else if (owner[k] <= -2) {
          Conn& h = handshakes_[size_t(-2 - owner[k])];
          if (h.fd >= 0) serve_handshake(h);
        } else {
          if (fds[k].revents & POLLOUT) write_some(owner[k]);
          if (fds[k].revents & (POLLIN | POLLHUP | POLLERR)) read_some(owner[k]);
        }
      }
      end_handshakes();
      if (pending_.empty() && now() >= deadline) return Event{};
    }
    Event e = std::move(pending_.front());
    pending_.pop_front();
    return e;
  }

  void disconnect(int32_t peer, bool immediately) override {
    Conn* c = lookup(peer);
    if (c == nullptr) return;
    if (!immediately) write_some(peer);
    if (c->fd >= 0) close(c->fd);
    *c = Conn{};
  }

  bool connected(int32_t peer) const override { return lookup(peer) != nullptr; }

  PeerStats stats(int32_t peer) const override {
    const Conn* c = lookup(peer);
    PeerStats s;
    if (c == nullptr) return s;
    tcp_info info{};
    socklen_t len = sizeof info;
    if (getsockopt(c->fd, IPPROTO_TCP, TCP_INFO, &info, &len) == 0) {
      s.rtt = info.tcpi_rtt * 1e-6;
      s.rtt_var = info.tcpi_rttvar * 1e-6;
      s.retransmits = info.tcpi_total_retrans;
    }
    return s;
  }

  size_t datagram_payload() const override { return options_.max_message_bytes; }

 private:
  bool secure() const { return !options_.key.empty(); }

  Conn* lookup(int32_t peer) {
    if (peer < 0 || size_t(peer) >= peers_.size() || peers_[peer].fd < 0) return nullptr;
    return &peers_[peer];
  }
  const Conn* lookup(int32_t peer) const { return const_cast<TcpTransport*>(this)->lookup(peer); }

  static void queue_frame(Conn& c, std::span<const uint8_t> frame) {
    const uint32_t n = uint32_t(frame.size());
    const uint8_t length[4] = {uint8_t(n), uint8_t(n >> 8), uint8_t(n >> 16), uint8_t(n >> 24)};
    c.out.insert(c.out.end(), length, length + 4);
    c.out.insert(c.out.end(), frame.begin(), frame.end());
  }

  // A peer id for an open (and, with a key, authenticated) connection; -1 (and closed) when full.
  int32_t add(Conn c) {
    int32_t open = 0;
    for (const Conn& p : peers_) open += p.fd >= 0;
    if (open >= max_peers_) {
      close(c.fd);
      return -1;
    }
    peers_.push_back(std::move(c));
    const int32_t id = int32_t(peers_.size() - 1);
    if (peers_.back().out.size() > 0) write_some(id);
    return lookup(id) ? id : -1;
  }

  void push(Event::Type type, int32_t peer, std::vector<uint8_t> data = {}) {
    Event e;
    e.type = type;
    e.peer = peer;
    e.data = std::move(data);
    e.time = now();
    pending_.push_back(std::move(e));
  }

  void lost(int32_t peer) {
    Conn& c = peers_[peer];
    if (c.fd < 0) return;
    close(c.fd);
    c = Conn{};
    push(Event::Type::disconnect, peer);
  }

  void accept_all() {
    while (true) {
      const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) return;
      set_nodelay(fd);
      if (!secure()) {
        Conn c;
        c.fd = fd;
        const int32_t id = add(std::move(c));
        if (id >= 0) push(Event::Type::connect, id);
        continue;
      }
      // A flood: the oldest handshake makes room, so silent connections cannot lock the
      // server; an honest client finishes within a round trip and is rarely the oldest.
      // (Closed, not erased: poll() still indexes handshakes_; end_handshakes() compacts.)
      Conn* oldest = nullptr;
      size_t open = 0;
      for (Conn& h : handshakes_) {
        if (h.fd < 0) continue;
        ++open;
        if (oldest == nullptr || h.deadline < oldest->deadline) oldest = &h;
      }
      if (open >= size_t(kPendingHandshakes)) {
        close(oldest->fd);
        oldest->fd = -1;
        ++auth_failures_;
      }
      Conn c;
      c.fd = fd;
      c.link = std::make_unique<SecureLink>(options_.key, SecureLink::Role::server, "edge.Transport", options_.aes);
      c.deadline = now() + kHandshakeTimeout;
      handshakes_.push_back(std::move(c));
    }
  }

  // Non-blocking send of what is queued; false when the connection failed.
  static bool write_conn(Conn& c) {
    while (c.out_sent < c.out.size()) {
      const ssize_t n = ::send(c.fd, c.out.data() + c.out_sent, c.out.size() - c.out_sent, MSG_NOSIGNAL);
      if (n > 0) {
        c.out_sent += size_t(n);
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      if (n < 0 && errno == EINTR) continue;
      return false;
    }
    if (c.out_sent == c.out.size()) {
      c.out.clear();
      c.out_sent = 0;
    }
    return c.out.size() - c.out_sent <= kMaxQueued;
  }

  void write_some(int32_t peer) {
    if (!write_conn(peers_[peer])) lost(peer);
  }

  // Reads what is there (at most one frame limit ahead of the parser) and hands
  // complete frames to on_frame; returns closed on EOF, an error or a bad frame.
  template <typename OnFrames>
  Io read_conn(Conn& c, OnFrames&& on_frames) {
    uint8_t buffer[65536];
    while (true) {
      const ssize_t n = recv(c.fd, buffer, sizeof buffer, 0);
      if (n > 0) {
        c.in.insert(c.in.end(), buffer, buffer + n);
        const Frames f = on_frames();
        if (f == Frames::bad) return Io::closed;
        if (f == Frames::stopped) return Io::ok;
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return Io::ok;
      if (n < 0 && errno == EINTR) continue;
      return Io::closed;  // orderly close or error
    }
  }

  // Splits complete frames off c.in into f(frame) -> bool (false: stop after it, keep
  // the rest). A length over the limit (the handshake's before authentication) is bad.
  template <typename F>
  Frames split(Conn& c, F&& f) {
    size_t at = 0;
    Frames result = Frames::done;
    while (c.in.size() - at >= 4) {
      const uint8_t* p = c.in.data() + at;
      const size_t n = size_t(p[0]) | size_t(p[1]) << 8 | size_t(p[2]) << 16 | size_t(p[3]) << 24;
      const size_t limit = c.link && !c.link->established() ? kHandshakeMaxBytes : max_frame_;
      if (n > limit) {
        ++auth_failures_;
        return Frames::bad;
      }
      if (c.in.size() - at - 4 < n) break;
      at += 4 + n;
      if (!f(std::span<const uint8_t>(p + 4, n))) {
        result = Frames::stopped;
        break;
      }
    }
    c.in.erase(c.in.begin(), c.in.begin() + std::ptrdiff_t(at));
    return result;
  }

  // Feeds a frame to c's link; false when it was refused (then c must be closed).
  bool step(Conn& c, std::span<const uint8_t> frame, std::vector<uint8_t>& message, SecureLink::Result& r) {
    r = c.link->receive(frame, message);
    if (r == SecureLink::Result::refused) {
      ++auth_failures_;
      return false;
    }
    if (r != SecureLink::Result::message && !message.empty()) queue_frame(c, message);
    return true;
  }

  void handshake_as_client(Conn& c, double deadline, const std::string& where, const std::string& late) {
    bool refused = false;
    auto on_frames = [&] {
      return split(c, [&](std::span<const uint8_t> frame) {
        std::vector<uint8_t> reply;
        SecureLink::Result r;
        refused = !step(c, frame, reply, r);
        return !refused && !c.link->established();
      });
    };
    auto fail = [&](const std::string& why) {
      close(c.fd);
      throw std::runtime_error(why);
    };
    const std::string closed =
        "[edge.connect] " + where + " closed the connection during the key handshake (wrong key, or no free slot)";
    while (!c.link->established()) {
      if (!write_conn(c)) fail(closed);
      pollfd p{c.fd, short(POLLIN | (c.out.size() > c.out_sent ? POLLOUT : 0)), 0};
      const timespec ts = to_timespec(deadline - now());
      const int r = ppoll(&p, 1, &ts, nullptr);
      if (r < 0 && errno == EINTR) continue;
      if (r == 0) fail(late);
      if (r < 0) fail("[edge.connect] " + where + ": " + errno_text());
      if ((p.revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
      const Io io = read_conn(c, on_frames);
      if (refused) fail("[edge.connect] " + where + " failed the key handshake (wrong key?)");
      if (io == Io::closed && !c.link->established()) fail(closed);
    }
    if (!write_conn(c)) fail("[edge.connect] " + where + " closed the connection after the key handshake");
  }

  // One handshake's turn: its frames, its replies; once it proved the key it becomes a peer.
  void serve_handshake(Conn& c) {
    bool done = false, refused = false;
    const Io io = read_conn(c, [&] {
      return split(c, [&](std::span<const uint8_t> frame) {
        std::vector<uint8_t> reply;
        SecureLink::Result r;
        refused = !step(c, frame, reply, r);
        done = !refused && c.link->established();
        return !refused && !done;
      });
    });
    if (refused || (io == Io::closed && !done) || !write_conn(c)) {
      if (!refused) ++auth_failures_;  // gone before proving the key: a failed handshake too
      close(c.fd);
      c.fd = -1;
      return;
    }
    if (!done) return;
    const int32_t id = add(std::move(c));
    c.fd = -1;
    if (id < 0) return;
    push(Event::Type::connect, id);
    if (!peers_[id].in.empty()) parse(id);
  }

  // Drops handshakes that ended or ran past their deadline.
  void end_handshakes() {
    const double t = now();
    for (Conn& c : handshakes_)
      if (c.fd >= 0 && t >= c.deadline) {
        close(c.fd);
        c.fd = -1;
        ++auth_failures_;
      }
    std::erase_if(handshakes_, [](const Conn& c) { return c.fd < 0; });
  }

  void read_some(int32_t peer) {
    if (read_conn(peers_[peer], [&] { return parse(peer) ? Frames::done : Frames::bad; }) == Io::closed) {
      if (peers_[peer].fd >= 0) parse(peer);
      lost(peer);
    }
  }

  // Complete frames of an established peer -> message events; false when one was bad.
  bool parse(int32_t peer) {
    Conn& c = peers_[peer];
    bool refused = false;
    const Frames f = split(c, [&](std::span<const uint8_t> frame) {
      if (!c.link) {
        push(Event::Type::message, peer, std::vector<uint8_t>(frame.begin(), frame.end()));
        return true;
      }
      std::vector<uint8_t> message;
      SecureLink::Result r;
      if (!step(c, frame, message, r)) return !(refused = true);
      push(Event::Type::message, peer, std::move(message));
      return true;
    });
    if (f == Frames::bad || refused) {
      lost(peer);
      return false;
    }
    return true;
  }

  int listen_fd_ = -1;
  uint16_t port_ = 0;
  int32_t max_peers_;
  TransportOptions options_;
  size_t max_frame_ = 0;
  uint64_t auth_failures_ = 0;
  std::vector<Conn> peers_;
  std::vector<Conn> handshakes_;  // accepted, not yet authenticated (at most kPendingHandshakes)
  std::vector<uint8_t> sealed_;
  std::deque<Event> pending_;
};

}  // namespace

std::unique_ptr<Transport> make_tcp_transport(const std::string& bind_host, uint16_t port, int32_t max_peers,
                                              const TransportOptions& options) {
  return std::make_unique<TcpTransport>(bind_host, port, max_peers, options);
}

}  // namespace halo::edge
