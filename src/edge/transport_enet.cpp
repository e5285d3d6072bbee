// ENet transport: three channels (control, reliable partials, unreliable
// partials); unreliable messages go unsequenced so a late one is still used.
#include <enet/enet.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <deque>
#include <mutex>
#include <stdexcept>

#include "halo/core/error.hpp"
#include "src/edge/transports.hpp"

namespace halo::edge {

namespace {

constexpr size_t kChannels = 3;

void init_enet() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (enet_initialize() != 0) throw std::runtime_error("[edge] enet_initialize failed");
    std::atexit(enet_deinitialize);
  });
}

// Our deadlines decide when a result is late or a peer gone, so ENet must
// neither drop unreliable packets when the round-trip time rises (throttle
// deceleration 0) nor give up on a peer on its own while the link is merely
// very lossy or the peer busy loading weights (30 s before it does).
// ENet starts every peer at a 500 ms round-trip estimate and moves it by 1/8 of
// the error per acknowledgement, so for the first ~50 reliable messages a lost one
// waits hundreds of ms for its resend. Start from a small estimate instead: a
// too-early resend is harmless and the estimate grows quickly where links are slow.
void configure_peer(ENetPeer* peer) {
  enet_peer_throttle_configure(peer, 5000, ENET_PEER_PACKET_THROTTLE_SCALE, 0);
  enet_peer_timeout(peer, 4096, 30000, 60000);
  peer->roundTripTime = 2;
  peer->roundTripTimeVariance = 1;
}

// Large socket buffers: a prefill answer from four workers arrives at once and
// must not be dropped by the receiving socket (that would be loss we did not ask for).
void grow_buffers(ENetSocket socket) {
  const int bytes = 8 << 20;
  if (setsockopt(socket, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) != 0)
    setsockopt(socket, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
  if (setsockopt(socket, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof bytes) != 0)
    setsockopt(socket, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
}

class EnetTransport final : public Transport {
 public:
  EnetTransport(const std::string& bind_host, uint16_t port, int32_t max_peers) {
    init_enet();
    require(max_peers > 0 && max_peers <= 4095, "edge.Transport", "max_peers must be in [1, 4095], got ", max_peers);
    if (bind_host.empty()) {
      host_ = enet_host_create(nullptr, size_t(max_peers), kChannels, 0, 0);
    } else {
      ENetAddress address{};
      require(enet_address_set_host_ip(&address, bind_host.c_str()) == 0, "edge.Transport",
              "listen address must be a numeric IPv4 address, got '", bind_host, "'");
      address.port = port;
      host_ = enet_host_create(&address, size_t(max_peers), kChannels, 0, 0);
      if (host_ == nullptr)
        throw std::runtime_error("[edge.Transport] cannot listen on udp " + bind_host + ":" + std::to_string(port) +
                                 " (address in use or not on this host)");
    }
    if (host_ == nullptr) throw std::runtime_error("[edge.Transport] enet_host_create failed");
    grow_buffers(host_->socket);
    ENetAddress bound{};
    if (enet_socket_get_address(host_->socket, &bound) == 0) port_ = bound.port;
  }
  ~EnetTransport() override {
    if (host_ != nullptr) {
      for (size_t i = 0; i < host_->peerCount; ++i)
        if (host_->peers[i].state == ENET_PEER_STATE_CONNECTED) enet_peer_disconnect_now(&host_->peers[i], 0);
      enet_host_flush(host_);
      enet_host_destroy(host_);
    }
  }

  Protocol protocol() const override { return Protocol::enet; }
  uint16_t port() const override { return port_; }

  int32_t connect(const std::string& host, uint16_t port, double timeout_s) override {
    const std::string where = "udp " + host + ":" + std::to_string(port);
    ENetAddress address{};
    if (enet_address_set_host(&address, host.c_str()) != 0)
      throw std::runtime_error("[edge.connect] cannot resolve " + where);
    address.port = port;
    ENetPeer* peer = enet_host_connect(host_, &address, kChannels, 0);
    if (peer == nullptr) throw std::runtime_error("[edge.connect] no free peer slot for " + where);
    const int32_t id = int32_t(peer - host_->peers);
    const double deadline = now() + std::max(0.0, timeout_s);
    while (true) {
      Event e = service(deadline);
      if (e.type == Event::Type::none) {
        enet_peer_reset(peer);
        throw std::runtime_error("[edge.connect] no answer from " + where + " within " + fmt(timeout_s) + " s");
      }
      if (e.peer == id && e.type == Event::Type::connect) return id;
      if (e.peer == id && e.type == Event::Type::disconnect)
        throw std::runtime_error("[edge.connect] " + where + " refused the connection");
      pending_.push_back(std::move(e));
    }
  }

  bool send(int32_t peer, std::span<const uint8_t> data, Delivery delivery) override {
    ENetPeer* p = lookup(peer);
    if (p == nullptr || p->state != ENET_PEER_STATE_CONNECTED) return false;
    const enet_uint32 flags = delivery == Delivery::unreliable ? ENET_PACKET_FLAG_UNSEQUENCED : ENET_PACKET_FLAG_RELIABLE;
    ENetPacket* packet = enet_packet_create(data.data(), data.size(), flags);
    if (packet == nullptr) throw std::runtime_error("[edge.send] out of memory");
    if (enet_peer_send(p, enet_uint8(delivery), packet) < 0) {
      enet_packet_destroy(packet);
      return false;
    }
    return true;
  }

  void flush() override { enet_host_flush(host_); }

  Event poll(double timeout_s) override {
    if (!pending_.empty()) {
      Event e = std::move(pending_.front());
      pending_.pop_front();
      return e;
    }
    return service(now() + std::max(0.0, timeout_s));
  }

  void disconnect(int32_t peer, bool immediately) override {
    ENetPeer* p = lookup(peer);
    if (p == nullptr || p->state == ENET_PEER_STATE_DISCONNECTED) return;
    if (immediately) {
      enet_peer_disconnect_now(p, 0);
    } else {
      enet_peer_disconnect_later(p, 0);  // after what is queued (an error message) went out
    }
    enet_host_flush(host_);
  }

  bool connected(int32_t peer) const override {
    const ENetPeer* p = lookup(peer);
    return p != nullptr && p->state == ENET_PEER_STATE_CONNECTED;
  }

  PeerStats stats(int32_t peer) const override {
    const ENetPeer* p = lookup(peer);
    require(p != nullptr, "edge.stats", "no peer ", peer);
    PeerStats s;
    s.rtt = p->roundTripTime * 1e-3;
    s.rtt_var = p->roundTripTimeVariance * 1e-3;
    s.loss = double(p->packetLoss) / double(int(ENET_PEER_PACKET_LOSS_SCALE));
    s.retransmits = p->packetsLost;
    return s;
  }

  size_t datagram_payload() const override { return host_->mtu - 40; }

 private:
  static std::string fmt(double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%.1f", v);
    return b;
  }
  ENetPeer* lookup(int32_t peer) const {
    if (peer < 0 || size_t(peer) >= host_->peerCount) return nullptr;
    return &host_->peers[peer];
  }

  // Runs ENet until it yields an event or `deadline` passes. ENet's resend
  // timers only advance inside enet_host_service, so the wait is cut into
  // slices of at most 1 ms; the socket wait itself has microsecond resolution.
  Event service(double deadline) {
    while (true) {
      ENetEvent ev;
      const int r = enet_host_service(host_, &ev, 0);
      if (r < 0) throw std::runtime_error(std::string("[edge.poll] enet_host_service failed: ") + std::strerror(errno));
      if (r > 0) {
        Event e;
        e.time = now();
        e.peer = int32_t(ev.peer - host_->peers);
        switch (ev.type) {
          case ENET_EVENT_TYPE_CONNECT:
            configure_peer(ev.peer);
            e.type = Event::Type::connect;
            return e;
          case ENET_EVENT_TYPE_DISCONNECT:
            e.type = Event::Type::disconnect;
            return e;
          case ENET_EVENT_TYPE_RECEIVE:
            e.type = Event::Type::message;
            e.data.assign(ev.packet->data, ev.packet->data + ev.packet->dataLength);
            enet_packet_destroy(ev.packet);
            return e;
          default:
            continue;
        }
      }
      const double t = now();
      if (t >= deadline) return Event{};
      const double wait = std::min(deadline - t, 1e-3);
      timespec ts{0, long(wait * 1e9)};
      pollfd fd{host_->socket, POLLIN, 0};
      ppoll(&fd, 1, &ts, nullptr);
    }
  }

  ENetHost* host_ = nullptr;
  uint16_t port_ = 0;
  std::deque<Event> pending_;
};

}  // namespace

std::unique_ptr<Transport> make_enet_transport(const std::string& bind_host, uint16_t port, int32_t max_peers) {
  return std::make_unique<EnetTransport>(bind_host, port, max_peers);
}

}  // namespace halo::edge
