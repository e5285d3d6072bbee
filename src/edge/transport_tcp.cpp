// TCP transport: the baseline's wait-for-all links, as distributed-llama and
// llama.cpp's RPC use them (TCP_NODELAY, the kernel's loss recovery). Frames
// are a 4-byte little-endian length and the message.
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
#include <stdexcept>

#include "halo/core/error.hpp"
#include "src/edge/transports.hpp"

namespace halo::edge {

namespace {

constexpr size_t kMaxFrame = size_t(1) << 28;
constexpr size_t kMaxQueued = size_t(1) << 28;  // unsent bytes before a peer counts as gone

std::string errno_text() { return std::strerror(errno); }

void set_nonblocking(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK); }

void set_nodelay(int fd) {
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
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
};

class TcpTransport final : public Transport {
 public:
  TcpTransport(const std::string& bind_host, uint16_t port, int32_t max_peers) : max_peers_(max_peers) {
    require(max_peers > 0 && max_peers <= 4095, "edge.Transport", "max_peers must be in [1, 4095], got ", max_peers);
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
    if (listen_fd_ >= 0) close(listen_fd_);
  }

  Protocol protocol() const override { return Protocol::tcp; }
  uint16_t port() const override { return port_; }

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
    while (true) {
      pollfd p{fd, POLLOUT, 0};
      const double left = std::max(0.0, deadline - now());
      timespec ts{time_t(left), long((left - double(time_t(left))) * 1e9)};
      const int r = ppoll(&p, 1, &ts, nullptr);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        close(fd);
        throw std::runtime_error("[edge.connect] no answer from " + where + " within " + std::to_string(timeout_s) +
                                 " s");
      }
      int err = 0;
      socklen_t len = sizeof err;
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        close(fd);
        throw std::runtime_error("[edge.connect] " + where + ": " + std::strerror(err));
      }
      const int32_t id = add(fd);
      if (id < 0) throw std::runtime_error("[edge.connect] no free peer slot for " + where);
      return id;
    }
  }

  bool send(int32_t peer, std::span<const uint8_t> data, Delivery) override {
    Conn* c = lookup(peer);
    if (c == nullptr) return false;
    require(data.size() <= kMaxFrame, "edge.send", "message of ", data.size(), " bytes exceeds ", kMaxFrame);
    const uint32_t n = uint32_t(data.size());
    const uint8_t length[4] = {uint8_t(n), uint8_t(n >> 8), uint8_t(n >> 16), uint8_t(n >> 24)};
    c->out.insert(c->out.end(), length, length + 4);
    c->out.insert(c->out.end(), data.begin(), data.end());
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
      std::vector<pollfd> fds;
      std::vector<int32_t> owner;
      if (listen_fd_ >= 0) fds.push_back({listen_fd_, POLLIN, 0}), owner.push_back(-1);
      for (size_t i = 0; i < peers_.size(); ++i) {
        if (peers_[i].fd < 0) continue;
        const short events = short(POLLIN | (peers_[i].out.size() > peers_[i].out_sent ? POLLOUT : 0));
        fds.push_back({peers_[i].fd, events, 0});
        owner.push_back(int32_t(i));
      }
      const double left = std::max(0.0, deadline - now());
      timespec ts{time_t(left), long((left - double(time_t(left))) * 1e9)};
      const int r = ppoll(fds.data(), fds.size(), &ts, nullptr);
      if (r < 0 && errno != EINTR) throw std::runtime_error("[edge.poll] ppoll: " + errno_text());
      for (size_t k = 0; r > 0 && k < fds.size(); ++k) {
        if (fds[k].revents == 0) continue;
        if (owner[k] < 0) {
          accept_all();
          continue;
        }
        if (fds[k].revents & POLLOUT) write_some(owner[k]);
        if (fds[k].revents & (POLLIN | POLLHUP | POLLERR)) read_some(owner[k]);
      }
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
    close(c->fd);
    c->fd = -1;
    c->in.clear();
    c->out.clear();
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

  size_t datagram_payload() const override { return kMaxFrame; }

 private:
  Conn* lookup(int32_t peer) {
    if (peer < 0 || size_t(peer) >= peers_.size() || peers_[peer].fd < 0) return nullptr;
    return &peers_[peer];
  }
  const Conn* lookup(int32_t peer) const { return const_cast<TcpTransport*>(this)->lookup(peer); }

  int32_t add(int fd) {
    int32_t open = 0;
    for (const Conn& c : peers_) open += c.fd >= 0;
    if (open >= max_peers_) {
      close(fd);
      return -1;
    }
    peers_.push_back(Conn{fd, {}, {}, 0});
    return int32_t(peers_.size() - 1);
  }

  void lost(int32_t peer) {
    Conn& c = peers_[peer];
    if (c.fd < 0) return;
    close(c.fd);
    c.fd = -1;
    c.in.clear();
    c.out.clear();
    Event e;
    e.type = Event::Type::disconnect;
    e.peer = peer;
    e.time = now();
    pending_.push_back(std::move(e));
  }

  void accept_all() {
    while (true) {
      const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) return;
      set_nodelay(fd);
      const int32_t id = add(fd);
      if (id < 0) continue;
      Event e;
      e.type = Event::Type::connect;
      e.peer = id;
      e.time = now();
      pending_.push_back(std::move(e));
    }
  }

  void write_some(int32_t peer) {
    Conn& c = peers_[peer];
    while (c.fd >= 0 && c.out_sent < c.out.size()) {
      const ssize_t n = ::send(c.fd, c.out.data() + c.out_sent, c.out.size() - c.out_sent, MSG_NOSIGNAL);
      if (n > 0) {
        c.out_sent += size_t(n);
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      if (n < 0 && errno == EINTR) continue;
      lost(peer);
      return;
    }
    if (c.out_sent == c.out.size()) {
      c.out.clear();
      c.out_sent = 0;
    } else if (c.out.size() - c.out_sent > kMaxQueued) {
      lost(peer);
    }
  }

  void read_some(int32_t peer) {
    Conn& c = peers_[peer];
    uint8_t buffer[65536];
    while (c.fd >= 0) {
      const ssize_t n = recv(c.fd, buffer, sizeof buffer, 0);
      if (n > 0) {
        c.in.insert(c.in.end(), buffer, buffer + n);
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      if (n < 0 && errno == EINTR) continue;
      parse(peer);
      lost(peer);  // orderly close or error
      return;
    }
    parse(peer);
  }

  void parse(int32_t peer) {
    Conn& c = peers_[peer];
    size_t at = 0;
    while (c.in.size() - at >= 4) {
      const uint8_t* p = c.in.data() + at;
      const size_t n = size_t(p[0]) | size_t(p[1]) << 8 | size_t(p[2]) << 16 | size_t(p[3]) << 24;
      if (n > kMaxFrame) {
        c.in.clear();
        lost(peer);  // not our protocol
        return;
      }
      if (c.in.size() - at - 4 < n) break;
      Event e;
      e.type = Event::Type::message;
      e.peer = peer;
      e.data.assign(p + 4, p + 4 + n);
      e.time = now();
      pending_.push_back(std::move(e));
      at += 4 + n;
    }
    c.in.erase(c.in.begin(), c.in.begin() + std::ptrdiff_t(at));
  }

  int listen_fd_ = -1;
  uint16_t port_ = 0;
  int32_t max_peers_;
  std::vector<Conn> peers_;
  std::deque<Event> pending_;
};

}  // namespace

std::unique_ptr<Transport> make_tcp_transport(const std::string& bind_host, uint16_t port, int32_t max_peers) {
  return std::make_unique<TcpTransport>(bind_host, port, max_peers);
}

}  // namespace halo::edge
