// Message transports of the edge runtime, one interface over two protocols:
//   enet - UDP with ENet: `control` and `reliable` messages are retransmitted
//          by ENet (on their own channels, so a lost input does not hold back a
//          partial), `unreliable` ones are sent once, unsequenced;
//   tcp  - one TCP connection per peer with TCP_NODELAY (every delivery mode is
//          reliable), length-prefixed frames: the baseline that waits for all.
// A root creates an unbound transport and connect()s to its workers; a worker
// binds ADDR:PORT and accepts. Every wait takes a timeout; nothing blocks past it.
// Not thread-safe: one thread owns a transport.
//
// With a key (TransportOptions::key, 32 bytes shared by both ends) every link is
// authenticated and sealed (halo/edge/link.hpp): a peer surfaces as `connect` only
// after it proved the key, connect() returns only after the server accepted us, and
// every message travels as an AEAD frame. Frames that fail (forged, replayed, too old,
// garbage, a wrong key) only raise auth_failures(); before the handshake nothing but
// its fixed-size frames is read. Without a key links are plaintext, as before.
// In both modes a peer's bad frames or transport errors end that peer's session or
// are dropped; nothing a peer sends makes poll() throw.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace halo::edge {

enum class Protocol { enet, tcp };
enum class Delivery : uint8_t { control = 0, reliable = 1, unreliable = 2 };

struct Event {
  enum class Type { none, connect, message, disconnect } type = Type::none;
  int32_t peer = -1;
  std::vector<uint8_t> data;
  double time = 0;  // monotonic seconds when the transport saw it
};

struct PeerStats {
  double rtt = 0;          // smoothed round-trip time, seconds
  double rtt_var = 0;      // its variation, seconds
  uint64_t retransmits = 0;  // enet: packets it had to resend; tcp: segments retransmitted
  double loss = 0;         // enet's own packet-loss estimate (tcp: 0)
};

// CLOCK_MONOTONIC seconds (the same clock as Python's time.monotonic()).
double now();

struct TransportOptions {
  std::vector<uint8_t> key;              // 32 bytes; empty: insecure (plaintext links)
  size_t max_message_bytes = 64u << 20;  // larger messages are refused before allocating
  bool aes = true;  // with a key: offer and accept AES-256-GCM where the CPU runs it (link.hpp);
                    // false: ChaCha20-Poly1305 only (benchmarks, tests)
};

class Transport {
 public:
  virtual ~Transport() = default;
  // bind_host empty: an unbound client (root). port 0 with a host: any free port.
  // Throws InvalidArgument for a key that is not 32 bytes or a zero max_message_bytes.
  static std::unique_ptr<Transport> create(Protocol protocol, const std::string& bind_host, uint16_t port,
                                           int32_t max_peers, const TransportOptions& options = {});
  virtual Protocol protocol() const = 0;
  virtual uint16_t port() const = 0;  // the bound port (0 for an unbound client)
  // Connects and waits for the handshake; throws std::runtime_error naming the
  // address when it fails or times out. Returns the peer id.
  virtual int32_t connect(const std::string& host, uint16_t port, double timeout_s) = 0;
  // False (and nothing sent) when the peer is not connected any more. Throws
  // InvalidArgument for a message over max_message_bytes.
  virtual bool send(int32_t peer, std::span<const uint8_t> data, Delivery delivery) = 0;
  virtual void flush() = 0;
  // The next event, or Type::none once `timeout_s` passed (0: only what is ready).
  virtual Event poll(double timeout_s) = 0;
  virtual void disconnect(int32_t peer, bool now) = 0;
  virtual bool connected(int32_t peer) const = 0;
  virtual PeerStats stats(int32_t peer) const = 0;
  // Largest message that travels as one datagram (tcp: max_message_bytes).
  virtual size_t datagram_payload() const = 0;
  // Frames refused so far: failed handshakes, forged, replayed or garbage frames, oversized ones.
  virtual uint64_t auth_failures() const = 0;
};

}  // namespace halo::edge
