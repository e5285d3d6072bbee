// ENet transport: three channels (control, reliable partials, unreliable
// partials); unreliable messages go unsequenced so a late one is still used.
// With a key, a peer ENet connected is in handshake (no `connect` event, only the
// fixed-size handshake frames read) until it proved the key or kHandshakeTimeout
// passed; kPendingHandshakes extra ENet slots hold such peers so that a flood of
// them cannot take the slots of authenticated ones.
#include <enet/enet.h>
#include <linux/filter.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <deque>
#include <mutex>
#include <memory>
#include <stdexcept>

#include "halo/core/error.hpp"
#include "halo/edge/link.hpp"
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

// ENet reads datagrams into a ENET_PROTOCOL_MAXIMUM_MTU buffer and fails the whole
// enet_host_service call (printing to stderr) on a longer one: drop those in the
// kernel. The filter sees the UDP header and the payload. service() also survives
// the failure, should one get through.
void drop_oversized_datagrams(ENetSocket socket) {
  sock_filter code[] = {
      {BPF_LD | BPF_W | BPF_LEN, 0, 0, 0},
      {BPF_JMP | BPF_JGT | BPF_K, 1, 0, ENET_PROTOCOL_MAXIMUM_MTU + 8},
      {BPF_RET | BPF_K, 0, 0, 0xFFFFFFFF},
      {BPF_RET | BPF_K, 0, 0, 0},
  };
  sock_fprog program{sizeof code / sizeof code[0], code};
  setsockopt(socket, SOL_SOCKET, SO_ATTACH_FILTER, &program, sizeof program);
}

// What the transport knows of an ENet peer slot beyond ENet (ENetPeer::data points here).
struct Slot {
  std::unique_ptr<SecureLink> link;  // with a key
  double deadline = 0;               // of the handshake
  bool outgoing = false;             // connect() is waiting for it
  bool visible = false;              // the user saw its `connect`
  bool refused = false;              // its handshake failed (connect() says so)
};

// The intercept: ENet hands it each datagram before it parses (and acknowledges) anything in it.
// - A peer still in its handshake sends nothing but handshake frames (at most 72 bytes plus
//   ENet's headers and acknowledgements); anything longer is dropped before ENet reads it, so an
//   unauthenticated peer cannot make ENet buffer a large fragmented message. Only ever drops, so
//   a forged peer id can at worst delay a handshake.
// - From an authenticated peer, every reliable packet that fits one datagram (SEND_RELIABLE:
//   control messages, layer inputs and partials of a decode step) is opened here
//   (SecureLink::verify_ahead); a datagram with one that is not authentic is dropped whole, so
//   ENet does not acknowledge it and the sender resends it: a packet altered in flight is
//   delayed, not lost. (Fragments of larger messages, and ENet's own command headers, are not
//   covered: those are checked only after ENet acknowledged them, see docs/edge.md.)
constexpr size_t kPreAuthDatagram = 256;
thread_local uint64_t* servicing_failures = nullptr;  // auth_failures_ of the transport in enet_host_service

size_t load16(const uint8_t* p) { return size_t(p[0]) << 8 | p[1]; }

// Bytes of packet data after a command of `command`'s fixed size (0: none, or not a send).
size_t command_data(uint8_t command, const uint8_t* at) {
  switch (command) {
    case ENET_PROTOCOL_COMMAND_SEND_RELIABLE:
      return load16(at + offsetof(ENetProtocolSendReliable, dataLength));
    case ENET_PROTOCOL_COMMAND_SEND_UNRELIABLE:
      return load16(at + offsetof(ENetProtocolSendUnreliable, dataLength));
    case ENET_PROTOCOL_COMMAND_SEND_UNSEQUENCED:
      return load16(at + offsetof(ENetProtocolSendUnsequenced, dataLength));
    case ENET_PROTOCOL_COMMAND_SEND_FRAGMENT:
    case ENET_PROTOCOL_COMMAND_SEND_UNRELIABLE_FRAGMENT:
      return load16(at + offsetof(ENetProtocolSendFragment, dataLength));
    default:
      return 0;
  }
}

int ENET_CALLBACK screen_datagram(ENetHost* host, ENetEvent*) {
  const uint8_t* d = host->receivedData;
  const size_t n = host->receivedDataLength;
  if (n < 2) return 0;
  const size_t field = load16(d);
  const size_t id = field & ENET_PROTOCOL_MAXIMUM_PEER_ID;
  if (id >= host->peerCount) return 0;  // a connect request, or not for a peer of ours: ENet decides
  const ENetPeer& peer = host->peers[id];
  Slot* slot = static_cast<Slot*>(peer.data);
  if (slot == nullptr) return 0;
  if (!slot->visible) return n > kPreAuthDatagram ? 1 : 0;  // with a key, visible = authenticated
  if (!slot->link || !slot->link->established() || (field & ENET_PROTOCOL_HEADER_FLAG_COMPRESSED) ||
      peer.address.host != host->receivedAddress.host || peer.address.port != host->receivedAddress.port)
    return 0;  // not an authenticated peer's datagram (ENet ignores it), or one ENet drops itself
  size_t at = (field & ENET_PROTOCOL_HEADER_FLAG_SENT_TIME) ? sizeof(ENetProtocolHeader) : 2;
  while (at + sizeof(ENetProtocolCommandHeader) <= n) {
    const uint8_t command = d[at] & ENET_PROTOCOL_COMMAND_MASK;
    const size_t size = enet_protocol_command_size(command);
    if (size == 0 || at + size > n) return 0;  // ENet stops reading here too
    const size_t data = command_data(command, d + at);
    if (at + size + data > n) return 0;
    if (command == ENET_PROTOCOL_COMMAND_SEND_RELIABLE &&
        !slot->link->verify_ahead(std::span<const uint8_t>(d + at + size, data))) {
      if (servicing_failures != nullptr) ++*servicing_failures;
      return 1;  // dropped unacknowledged: the sender resends it
    }
    at += size + data;
  }
  return 0;
}

class EnetTransport final : public Transport {
 public:
  EnetTransport(const std::string& bind_host, uint16_t port, int32_t max_peers, const TransportOptions& options)
      : max_peers_(max_peers), options_(options) {
    init_enet();
    require(max_peers > 0 && max_peers <= 4095, "edge.Transport", "max_peers must be in [1, 4095], got ", max_peers);
    const size_t slots = std::min<size_t>(4095, size_t(max_peers) + (secure() ? kPendingHandshakes : 0));
    if (bind_host.empty()) {
      host_ = enet_host_create(nullptr, slots, kChannels, 0, 0);
    } else {
      ENetAddress address{};
      require(enet_address_set_host_ip(&address, bind_host.c_str()) == 0, "edge.Transport",
              "listen address must be a numeric IPv4 address, got '", bind_host, "'");
      address.port = port;
      host_ = enet_host_create(&address, slots, kChannels, 0, 0);
      if (host_ == nullptr)
        throw std::runtime_error("[edge.Transport] cannot listen on udp " + bind_host + ":" + std::to_string(port) +
                                 " (address in use or not on this host)");
    }
    if (host_ == nullptr) throw std::runtime_error("[edge.Transport] enet_host_create failed");
    // ENet refuses a fragmented message announcing more than this before buffering it.
    host_->maximumPacketSize = options.max_message_bytes + (secure() ? kSealOverhead : 0);
    host_->maximumWaitingData = std::max<size_t>(host_->maximumPacketSize, ENET_HOST_DEFAULT_MAXIMUM_WAITING_DATA);
    grow_buffers(host_->socket);
    drop_oversized_datagrams(host_->socket);
    slots_.resize(host_->peerCount);  // never resized again: peers point into it
    for (size_t i = 0; i < slots_.size(); ++i) host_->peers[i].data = &slots_[i];
    if (secure()) host_->intercept = screen_datagram;
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
  uint64_t auth_failures() const override { return auth_failures_; }

  int32_t connect(const std::string& host, uint16_t port, double timeout_s) override {
    const std::string where = "udp " + host + ":" + std::to_string(port);
    ENetAddress address{};
    if (enet_address_set_host(&address, host.c_str()) != 0)
      throw std::runtime_error("[edge.connect] cannot resolve " + where);
    address.port = port;
    ENetPeer* peer = enet_host_connect(host_, &address, kChannels, 0);
    if (peer == nullptr) throw std::runtime_error("[edge.connect] no free peer slot for " + where);
    const int32_t id = int32_t(peer - host_->peers);
    slots_[id] = Slot{};
    slots_[id].outgoing = true;
    peer->data = &slots_[id];
    const double deadline = now() + std::max(0.0, timeout_s);
    while (true) {
      Event e = service(deadline);
      if (e.type == Event::Type::none) {
        enet_peer_reset(peer);
        slots_[id] = Slot{};
        throw std::runtime_error("[edge.connect] no answer from " + where + " within " + fmt(timeout_s) + " s");
      }
      if (e.peer == id && e.type == Event::Type::connect) {
        slots_[id].outgoing = false;
        return id;
      }
      if (e.peer == id && e.type == Event::Type::disconnect) {
        const bool refused = slots_[id].refused;
        slots_[id] = Slot{};
        throw std::runtime_error("[edge.connect] " + where +
                                 (refused ? " failed the key handshake (wrong key?)"
                                          : " refused the connection (wrong key, or no free slot)"));
      }
      pending_.push_back(std::move(e));
    }
  }

  bool send(int32_t peer, std::span<const uint8_t> data, Delivery delivery) override {
    ENetPeer* p = lookup(peer);
    if (p == nullptr || p->state != ENET_PEER_STATE_CONNECTED || !slots_[peer].visible) return false;
    require(data.size() <= options_.max_message_bytes, "edge.send", "message of ", data.size(),
            " bytes exceeds max_message_bytes ", options_.max_message_bytes);
    if (slots_[peer].link) {
      slots_[peer].link->seal(delivery, data, sealed_);
      data = sealed_;
    }
    return send_raw(p, data, delivery);
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
    slots_[peer] = Slot{};
    if (immediately) {
      enet_peer_disconnect_now(p, 0);
    } else {
      enet_peer_disconnect_later(p, 0);  // after what is queued (an error message) went out
    }
    enet_host_flush(host_);
  }

  bool connected(int32_t peer) const override {
    const ENetPeer* p = lookup(peer);
    return p != nullptr && p->state == ENET_PEER_STATE_CONNECTED && slots_[peer].visible;
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

  size_t datagram_payload() const override { return host_->mtu - 40 - (secure() ? kSealOverhead : 0); }

 private:
  bool secure() const { return !options_.key.empty(); }
  static std::string fmt(double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%.1f", v);
    return b;
  }
  ENetPeer* lookup(int32_t peer) const {
    if (peer < 0 || size_t(peer) >= host_->peerCount) return nullptr;
    return &host_->peers[peer];
  }

  bool send_raw(ENetPeer* p, std::span<const uint8_t> data, Delivery delivery) {
    const enet_uint32 flags =
        delivery == Delivery::unreliable ? ENET_PACKET_FLAG_UNSEQUENCED : ENET_PACKET_FLAG_RELIABLE;
    ENetPacket* packet = enet_packet_create(data.data(), data.size(), flags);
    if (packet == nullptr) throw std::runtime_error("[edge.send] out of memory");
    if (enet_peer_send(p, enet_uint8(delivery), packet) < 0) {
      enet_packet_destroy(packet);
      return false;
    }
    return true;
  }

  // Ends a peer that has not become visible (a failed or late handshake): no event.
  void drop(int32_t id) {
    ++auth_failures_;
    const bool outgoing = slots_[id].outgoing;
    slots_[id] = Slot{};
    slots_[id].outgoing = outgoing;
    slots_[id].refused = true;
    enet_peer_disconnect_now(&host_->peers[id], 0);
  }

  void expire_handshakes(double t) {
    if (!secure() || t < next_expiry_check_) return;
    next_expiry_check_ = t + 0.05;
    for (size_t i = 0; i < slots_.size(); ++i)
      if (slots_[i].link && !slots_[i].visible && !slots_[i].outgoing && t >= slots_[i].deadline) drop(int32_t(i));
  }

  // Keeps a slot free for the next peer: with kPendingHandshakes - 1 handshakes in
  // progress the oldest is dropped, so a flood of silent peers cannot lock the server.
  void make_room(int32_t newest) {
    int32_t pending = 0, oldest = -1;
    for (size_t i = 0; i < slots_.size(); ++i) {
      const Slot& s = slots_[i];
      if (!s.link || s.visible || s.outgoing || int32_t(i) == newest) continue;
      ++pending;
      if (oldest < 0 || s.deadline < slots_[oldest].deadline) oldest = int32_t(i);
    }
    if (pending >= kPendingHandshakes - 1) drop(oldest);
  }

  int32_t visible_peers() const {
    int32_t n = 0;
    for (const Slot& s : slots_) n += s.visible;
    return n;
  }

  // A frame from a peer with a key: the event it makes for the user, if any.
  bool receive_sealed(int32_t id, std::span<const uint8_t> frame, Event& e) {
    Slot& slot = slots_[id];
    if (!slot.link) return false;  // not connected as far as we know: ignore
    const SecureLink::Result r = slot.link->receive(frame, reply_);
    switch (r) {
      case SecureLink::Result::refused:
        if (slot.link->established()) {
          ++auth_failures_;  // a forged or replayed datagram: drop it, keep the peer
          return false;
        }
        drop(id);
        if (!slot.outgoing) return false;
        e.type = Event::Type::disconnect;  // connect() reports it
        return true;
      case SecureLink::Result::handshake:
        send_raw(&host_->peers[id], reply_, Delivery::control);
        enet_host_flush(host_);
        return false;
      case SecureLink::Result::established:
        if (!slot.outgoing && visible_peers() >= max_peers_) {  // full: no READY, the client's connect() fails
          slots_[id] = Slot{};
          enet_peer_disconnect_now(&host_->peers[id], 0);
          return false;
        }
        if (!reply_.empty()) send_raw(&host_->peers[id], reply_, Delivery::control);
        enet_host_flush(host_);
        slot.visible = true;
        e.type = Event::Type::connect;
        return true;
      case SecureLink::Result::message:
        e.type = Event::Type::message;
        e.data = std::move(reply_);
        reply_ = {};
        return true;
    }
    return false;
  }

  // Runs ENet until it yields an event or `deadline` passes. ENet's resend
  // timers only advance inside enet_host_service, so the wait is cut into
  // slices of at most 1 ms; the socket wait itself has microsecond resolution.
  // A failed enet_host_service (an error on the socket, a malformed datagram) is
  // not the process's problem: the next call carries on.
  Event service(double deadline) {
    while (true) {
      ENetEvent ev;
      servicing_failures = &auth_failures_;
      const int r = enet_host_service(host_, &ev, 0);
      servicing_failures = nullptr;
      if (r > 0) {
        Event e;
        e.time = now();
        e.peer = int32_t(ev.peer - host_->peers);
        Slot& slot = slots_[e.peer];
        switch (ev.type) {
          case ENET_EVENT_TYPE_CONNECT:
            configure_peer(ev.peer);
            ev.peer->data = &slot;
            if (!slot.outgoing) slot = Slot{};
            if (!secure()) {
              slot.visible = true;
              e.type = Event::Type::connect;
              return e;
            }
            slot.link = std::make_unique<SecureLink>(
                options_.key, slot.outgoing ? SecureLink::Role::client : SecureLink::Role::server, "edge.Transport",
                options_.aes);
            slot.deadline = e.time + kHandshakeTimeout;
            if (!slot.outgoing) make_room(e.peer);
            if (slot.outgoing) {
              send_raw(ev.peer, slot.link->hello(), Delivery::control);
              enet_host_flush(host_);
            }
            continue;
          case ENET_EVENT_TYPE_DISCONNECT: {
            const bool report = slot.visible || slot.outgoing;
            const bool refused = slot.refused;
            if (slot.link && !slot.visible && !slot.outgoing) ++auth_failures_;  // gone before proving the key
            slots_[e.peer] = Slot{};
            slots_[e.peer].refused = refused;
            if (!report) continue;
            e.type = Event::Type::disconnect;
            return e;
          }
          case ENET_EVENT_TYPE_RECEIVE: {
            const std::span<const uint8_t> data(ev.packet->data, ev.packet->dataLength);
            bool deliver = false;
            if (!secure()) {
              deliver = slot.visible;
              e.type = Event::Type::message;
              if (deliver) e.data.assign(data.begin(), data.end());
            } else {
              deliver = receive_sealed(e.peer, data, e);
            }
            enet_packet_destroy(ev.packet);
            if (deliver) return e;
            continue;
          }
          default:
            continue;
        }
      }
      const double t = now();
      expire_handshakes(t);
      if (t >= deadline) return Event{};
      const double wait = std::min(deadline - t, 1e-3);
      timespec ts{0, long(wait * 1e9)};
      pollfd fd{host_->socket, POLLIN, 0};
      ppoll(&fd, 1, &ts, nullptr);
    }
  }

  ENetHost* host_ = nullptr;
  uint16_t port_ = 0;
  int32_t max_peers_;
  TransportOptions options_;
  uint64_t auth_failures_ = 0;
  double next_expiry_check_ = 0;
  std::vector<Slot> slots_;
  std::vector<uint8_t> sealed_, reply_;
  std::deque<Event> pending_;
};

}  // namespace

std::unique_ptr<Transport> make_enet_transport(const std::string& bind_host, uint16_t port, int32_t max_peers,
                                               const TransportOptions& options) {
  return std::make_unique<EnetTransport>(bind_host, port, max_peers, options);
}

}  // namespace halo::edge
