// Link security of the edge transports (libsodium), one end of one link, no sockets:
//
//   handshake  client -> server  HELLO  (client nonce Nc)
//              server -> client  CHALLENGE (server nonce Ns, proof_s = MAC_K("server", Nc, Ns))
//              client -> server  PROOF  (proof_c = MAC_K("client", Nc, Ns))
//              server -> client  READY  (an empty sealed control frame: the server accepted us)
//   Both nonces are fresh random, so a recorded handshake proves nothing later; the role label
//   keeps one side's proof from serving as the other's. MAC = keyed BLAKE2b-256.
//   Session keys, one per direction: BLAKE2b_K("c2s" | "s2c", Nc, Ns, suite).
//   Cipher suite: HELLO's byte 5 is the client's offer (bit 0: AES-256-GCM, which libsodium
//   runs only with AES-NI and PCLMUL), CHALLENGE's byte 5 the server's choice (1: AES-256-GCM,
//   when both have it, about twice as fast here; 0: ChaCha20-Poly1305, everywhere else). Both
//   bytes are under both proofs and the session keys, so a changed offer or choice fails the
//   handshake. (A client that offers nothing, as before the suites, gets ChaCha20-Poly1305.)
//   sealed     [0x53][channel][counter, 8 bytes LE][AEAD ciphertext + 16-byte tag];
//              nonce = channel, 3 zero bytes, counter; the first 10 bytes are associated data.
//              Each direction and channel counts from 0. Reliable channels (control,
//              reliable) arrive in order: a counter below the next expected one is a replay.
//              The unreliable channel is unsequenced: a 1024-message sliding window accepts
//              a reordered fresh counter once and refuses replayed or older ones.
// Nothing is parsed before the peer proved the key except the fixed-size handshake frames;
// receive() never throws on its input and refuses everything else.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <span>
#include <vector>

#include "halo/edge/transport.hpp"

namespace halo::edge {

inline constexpr size_t kKeyBytes = 32;
inline constexpr size_t kSealOverhead = 10 + 16;  // header + tag
inline constexpr size_t kHandshakeMaxBytes = 72;  // the largest handshake frame
inline constexpr uint64_t kReplayWindow = 1024;
inline constexpr size_t kAheadFrames = 256;  // verified reliable frames kept for receive()

// 32 random bytes from libsodium's generator.
std::vector<uint8_t> keygen();
// Whether this CPU runs libsodium's AES-256-GCM (AES-NI and PCLMUL), the faster suite.
bool aes256gcm_available();

class SecureLink {
 public:
  enum class Role { client, server };
  enum class Result {
    refused,      // not authentic, replayed, too old or out of place: drop it (before
                  // established(): end the session)
    handshake,    // a handshake step: send `out` (when not empty)
    established,  // the peer proved the key: send `out` (when not empty), then the link carries messages
    message,      // `out` is an authentic message
  };

  enum class Suite : uint8_t { chacha20poly1305 = 0, aes256gcm = 1 };

  // Throws InvalidArgument naming `function` unless key has kKeyBytes bytes. offer_aes false:
  // this end neither offers nor accepts AES-256-GCM (tests; machines without AES-NI never do).
  SecureLink(std::span<const uint8_t> key, Role role, const char* function = "edge.Transport",
             bool offer_aes = true);
  ~SecureLink();
  SecureLink(const SecureLink&) = delete;
  SecureLink& operator=(const SecureLink&) = delete;

  // Client: the first handshake frame (call once).
  std::vector<uint8_t> hello();
  Result receive(std::span<const uint8_t> frame, std::vector<uint8_t>& out);
  bool established() const { return state_ == State::established; }
  // The cipher of the sealed frames (meaningful once the CHALLENGE was sent or received).
  Suite suite() const { return suite_; }
  // ENet: checks a frame of a reliable channel (control, reliable) before ENet acknowledges the
  // datagram that carries it, so that one altered in flight is dropped unacknowledged and resent.
  // True when it is authentic (or not for this check: before established(), the unreliable
  // channel); the plaintext is kept (at most kAheadFrames) for receive(), which then skips the
  // decryption. Window checks stay with receive(), in delivery order.
  bool verify_ahead(std::span<const uint8_t> frame);
  // Seals one message for `channel` (appends to `frame` after clearing it). Requires established().
  void seal(Delivery channel, std::span<const uint8_t> message, std::vector<uint8_t>& frame);

 private:
  enum class State { start, sent_hello, sent_challenge, sent_proof, established, failed };
  struct Window {  // per receive channel
    uint64_t next = 0;                                  // reliable: the lowest acceptable counter
    uint64_t top = 0;                                   // unreliable: highest counter seen + 1
    std::array<uint64_t, kReplayWindow / 64> seen{};   // unreliable: bit (c % 1024) for c in [top-1024, top)
  };
  Result refuse();
  void derive();
  bool fresh(uint8_t channel, uint64_t counter) const;
  void mark(uint8_t channel, uint64_t counter);
  bool open(std::span<const uint8_t> frame, std::vector<uint8_t>& out, uint8_t& channel);
  bool decrypt(std::span<const uint8_t> frame, uint8_t channel, uint64_t counter, std::vector<uint8_t>& out);
  bool take_ahead(std::span<const uint8_t> frame, uint8_t channel, uint64_t counter, std::vector<uint8_t>& out);
  struct Ahead {  // a reliable frame verify_ahead() opened
    uint8_t channel;
    uint64_t counter;
    std::array<uint8_t, 16> tag;
    std::vector<uint8_t> plaintext;
  };

  Role role_;
  bool aes_ = false;  // this end may use AES-256-GCM
  uint8_t offer_ = 0;  // the client's offer, as sent or received
  Suite suite_ = Suite::chacha20poly1305;
  State state_ = State::start;
  std::array<uint8_t, kKeyBytes> key_{};
  std::array<uint8_t, 32> nonce_client_{}, nonce_server_{};
  std::array<uint8_t, kKeyBytes> send_key_{}, receive_key_{};
  std::array<uint64_t, 3> send_counter_{};
  std::array<Window, 3> windows_{};
  // AES-256-GCM key schedules of send_key_ and receive_key_ (beforenm), made once per session.
  // (libsodium's crypto_aead_aes256gcm_state, kept opaque here: link.cpp checks size and alignment.)
  alignas(16) std::array<uint8_t, 512> send_state_{}, receive_state_{};
  std::deque<Ahead> ahead_;
};

}  // namespace halo::edge
