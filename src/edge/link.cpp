#include "halo/edge/link.hpp"

#include <sodium.h>

#include <cstring>
#include <stdexcept>

#include "halo/core/error.hpp"

namespace halo::edge {

namespace {

constexpr uint8_t kMagic[4] = {'H', 'L', 'K', '1'};
constexpr uint8_t kHello = 1, kChallenge = 2, kProof = 3;
constexpr size_t kHelloBytes = 8 + 32, kChallengeBytes = 8 + 64, kProofBytes = 8 + 32;
constexpr uint8_t kSealed = 0x53;
constexpr size_t kSealHeader = 10;
constexpr size_t kTag = crypto_aead_chacha20poly1305_ietf_ABYTES;
static_assert(kSealHeader + kTag == kSealOverhead && kChallengeBytes == kHandshakeMaxBytes);
static_assert(crypto_aead_aes256gcm_ABYTES == kTag &&
              crypto_aead_aes256gcm_NPUBBYTES == crypto_aead_chacha20poly1305_ietf_NPUBBYTES);
static_assert(sizeof(crypto_aead_aes256gcm_state) == 512 && alignof(crypto_aead_aes256gcm_state) <= 16);
constexpr uint8_t kUnreliable = uint8_t(Delivery::unreliable);
constexpr uint8_t kOfferAes = 1;  // HELLO byte 5: the client can run AES-256-GCM

crypto_aead_aes256gcm_state* gcm(std::array<uint8_t, 512>& state) {
  return reinterpret_cast<crypto_aead_aes256gcm_state*>(state.data());
}

void init_sodium() {
  if (sodium_init() < 0) throw std::runtime_error("[edge] libsodium failed to initialise");
}

// Keyed BLAKE2b-256 over an 8-byte label, both nonces and the suite bytes (the client's offer,
// the server's choice): the proofs and the session keys. ChaCha20-Poly1305 chosen without an
// offer (a client from before the suites) hashes no suite bytes, as then.
void mac(const std::array<uint8_t, kKeyBytes>& key, const char (&label)[9], const std::array<uint8_t, 32>& nc,
         const std::array<uint8_t, 32>& ns, uint8_t offer, uint8_t choice, uint8_t* out) {
  crypto_generichash_state s;
  crypto_generichash_init(&s, key.data(), key.size(), 32);
  crypto_generichash_update(&s, reinterpret_cast<const uint8_t*>(label), 8);
  crypto_generichash_update(&s, nc.data(), nc.size());
  crypto_generichash_update(&s, ns.data(), ns.size());
  if (offer != 0 || choice != 0) {
    const uint8_t suite[2] = {offer, choice};
    crypto_generichash_update(&s, suite, 2);
  }
  crypto_generichash_final(&s, out, 32);
  sodium_memzero(&s, sizeof s);
}

std::vector<uint8_t> handshake_frame(uint8_t type, size_t bytes) {
  std::vector<uint8_t> f(bytes, 0);
  std::memcpy(f.data(), kMagic, 4);
  f[4] = type;
  return f;
}

// byte5_max: the largest value byte 5 (the suite offer or choice) may have.
bool is_handshake(std::span<const uint8_t> f, uint8_t type, size_t bytes, uint8_t byte5_max = 0) {
  return f.size() == bytes && std::memcmp(f.data(), kMagic, 4) == 0 && f[4] == type && f[5] <= byte5_max &&
         f[6] == 0 && f[7] == 0;
}

void make_nonce(uint8_t channel, uint64_t counter, uint8_t* nonce) {
  std::memset(nonce, 0, crypto_aead_chacha20poly1305_ietf_NPUBBYTES);
  nonce[0] = channel;
  for (int i = 0; i < 8; ++i) nonce[4 + i] = uint8_t(counter >> (8 * i));
}

}  // namespace

std::vector<uint8_t> keygen() {
  init_sodium();
  std::vector<uint8_t> key(kKeyBytes);
  randombytes_buf(key.data(), key.size());
  return key;
}

bool aes256gcm_available() {
  init_sodium();
  return crypto_aead_aes256gcm_is_available() != 0;
}

SecureLink::SecureLink(std::span<const uint8_t> key, Role role, const char* function, bool offer_aes)
    : role_(role) {
  require(key.size() == kKeyBytes, function, "key must be ", kKeyBytes, " bytes, got ", key.size());
  init_sodium();
  aes_ = offer_aes && aes256gcm_available();
  std::memcpy(key_.data(), key.data(), kKeyBytes);
}

SecureLink::~SecureLink() {
  sodium_memzero(key_.data(), key_.size());
  sodium_memzero(send_key_.data(), send_key_.size());
  sodium_memzero(receive_key_.data(), receive_key_.size());
  sodium_memzero(send_state_.data(), send_state_.size());
  sodium_memzero(receive_state_.data(), receive_state_.size());
}

std::vector<uint8_t> SecureLink::hello() {
  require(role_ == Role::client && state_ == State::start, "edge.SecureLink", "hello() is the client's first step");
  randombytes_buf(nonce_client_.data(), nonce_client_.size());
  std::vector<uint8_t> f = handshake_frame(kHello, kHelloBytes);
  offer_ = aes_ ? kOfferAes : 0;
  f[5] = offer_;
  std::memcpy(f.data() + 8, nonce_client_.data(), 32);
  state_ = State::sent_hello;
  return f;
}

SecureLink::Result SecureLink::refuse() {
  if (state_ != State::established) state_ = State::failed;
  return Result::refused;
}

void SecureLink::derive() {
  uint8_t c2s[32], s2c[32];
  const uint8_t choice = uint8_t(suite_);
  mac(key_, "key  c2s", nonce_client_, nonce_server_, offer_, choice, c2s);
  mac(key_, "key  s2c", nonce_client_, nonce_server_, offer_, choice, s2c);
  std::memcpy(send_key_.data(), role_ == Role::client ? c2s : s2c, 32);
  std::memcpy(receive_key_.data(), role_ == Role::client ? s2c : c2s, 32);
  if (suite_ == Suite::aes256gcm) {
    crypto_aead_aes256gcm_beforenm(gcm(send_state_), send_key_.data());
    crypto_aead_aes256gcm_beforenm(gcm(receive_state_), receive_key_.data());
  }
  sodium_memzero(c2s, 32);
  sodium_memzero(s2c, 32);
}

SecureLink::Result SecureLink::receive(std::span<const uint8_t> frame, std::vector<uint8_t>& out) {
  out.clear();
  uint8_t expected[32];
  switch (state_) {
    case State::start:  // server: HELLO -> CHALLENGE
      if (role_ != Role::server || !is_handshake(frame, kHello, kHelloBytes, kOfferAes)) return refuse();
      offer_ = frame[5];
      suite_ = aes_ && (offer_ & kOfferAes) ? Suite::aes256gcm : Suite::chacha20poly1305;
      std::memcpy(nonce_client_.data(), frame.data() + 8, 32);
      randombytes_buf(nonce_server_.data(), nonce_server_.size());
      out = handshake_frame(kChallenge, kChallengeBytes);
      out[5] = uint8_t(suite_);
      std::memcpy(out.data() + 8, nonce_server_.data(), 32);
      mac(key_, "proof  s", nonce_client_, nonce_server_, offer_, uint8_t(suite_), out.data() + 40);
      state_ = State::sent_challenge;
      return Result::handshake;
    case State::sent_hello:  // client: CHALLENGE -> PROOF
      if (!is_handshake(frame, kChallenge, kChallengeBytes, offer_)) return refuse();  // chose what we offered
      suite_ = Suite(frame[5]);
      std::memcpy(nonce_server_.data(), frame.data() + 8, 32);
      mac(key_, "proof  s", nonce_client_, nonce_server_, offer_, uint8_t(suite_), expected);
      if (sodium_memcmp(expected, frame.data() + 40, 32) != 0) return refuse();
      out = handshake_frame(kProof, kProofBytes);
      mac(key_, "proof  c", nonce_client_, nonce_server_, offer_, uint8_t(suite_), out.data() + 8);
      derive();
      state_ = State::sent_proof;
      return Result::handshake;
    case State::sent_challenge:  // server: PROOF -> READY
      if (!is_handshake(frame, kProof, kProofBytes)) return refuse();
      mac(key_, "proof  c", nonce_client_, nonce_server_, offer_, uint8_t(suite_), expected);
      if (sodium_memcmp(expected, frame.data() + 8, 32) != 0) return refuse();
      derive();
      state_ = State::established;
      seal(Delivery::control, {}, out);
      return Result::established;
    case State::sent_proof: {  // client: READY
      uint8_t channel = 0;
      if (!open(frame, out, channel) || channel != uint8_t(Delivery::control) || !out.empty()) return refuse();
      state_ = State::established;
      return Result::established;
    }
    case State::established: {
      uint8_t channel = 0;
      return open(frame, out, channel) ? Result::message : Result::refused;
    }
    case State::failed:
      break;
  }
  return Result::refused;
}

bool SecureLink::fresh(uint8_t channel, uint64_t counter) const {
  if (counter == UINT64_MAX) return false;
  const Window& w = windows_[channel];
  if (channel != kUnreliable) return counter >= w.next;
  if (counter >= w.top) return true;
  if (w.top - counter > kReplayWindow) return false;  // too old to tell: refused
  const uint64_t bit = counter % kReplayWindow;
  return (w.seen[bit / 64] >> (bit % 64) & 1) == 0;
}

void SecureLink::mark(uint8_t channel, uint64_t counter) {
  Window& w = windows_[channel];
  if (channel != kUnreliable) {
    w.next = counter + 1;
    return;
  }
  if (counter >= w.top) {
    // The slots of the counters the window slides over held counters 1024 older: clear them.
    const uint64_t slide = std::min<uint64_t>(counter + 1 - w.top, kReplayWindow);
    for (uint64_t i = 0; i < slide; ++i) {
      const uint64_t bit = (w.top + i) % kReplayWindow;
      w.seen[bit / 64] &= ~(uint64_t(1) << (bit % 64));
    }
    w.top = counter + 1;
  }
  const uint64_t bit = counter % kReplayWindow;
  w.seen[bit / 64] |= uint64_t(1) << (bit % 64);
}

namespace {

uint64_t frame_counter(std::span<const uint8_t> frame) {
  uint64_t counter = 0;
  for (int i = 0; i < 8; ++i) counter |= uint64_t(frame[2 + i]) << (8 * i);
  return counter;
}

}  // namespace

bool SecureLink::decrypt(std::span<const uint8_t> frame, uint8_t channel, uint64_t counter,
                         std::vector<uint8_t>& out) {
  uint8_t nonce[crypto_aead_chacha20poly1305_ietf_NPUBBYTES];
  make_nonce(channel, counter, nonce);
  out.resize(frame.size() - kSealOverhead);
  unsigned long long n = 0;
  const uint8_t* sealed = frame.data() + kSealHeader;
  const size_t sealed_bytes = frame.size() - kSealHeader;
  const int failed =
      suite_ == Suite::aes256gcm
          ? crypto_aead_aes256gcm_decrypt_afternm(out.data(), &n, nullptr, sealed, sealed_bytes, frame.data(),
                                                  kSealHeader, nonce, gcm(receive_state_))
          : crypto_aead_chacha20poly1305_ietf_decrypt(out.data(), &n, nullptr, sealed, sealed_bytes, frame.data(),
                                                      kSealHeader, nonce, receive_key_.data());
  if (failed != 0) out.clear();
  return failed == 0;
}

bool SecureLink::verify_ahead(std::span<const uint8_t> frame) {
  if (state_ != State::established) return true;  // handshake frames: receive() judges them
  if (frame.size() < kSealOverhead || frame[0] != kSealed || frame[1] >= kUnreliable) return false;
  const uint8_t channel = frame[1];
  const uint64_t counter = frame_counter(frame);
  Ahead a{channel, counter, {}, {}};
  std::memcpy(a.tag.data(), frame.data() + frame.size() - kTag, kTag);
  // Opened even when its counter was delivered already (a resend ENet will drop as a duplicate):
  // a counter changed on the way must fail here too, not be acknowledged.
  if (!decrypt(frame, channel, counter, a.plaintext)) return false;
  if (!fresh(channel, counter)) return true;
  if (ahead_.size() >= kAheadFrames) ahead_.pop_front();
  ahead_.push_back(std::move(a));
  return true;
}

bool SecureLink::take_ahead(std::span<const uint8_t> frame, uint8_t channel, uint64_t counter,
                            std::vector<uint8_t>& out) {
  bool found = false;
  for (auto it = ahead_.begin(); it != ahead_.end();) {
    if (it->channel != channel || it->counter > counter) {
      ++it;
      continue;
    }
    // The same channel, counter and tag (and length): the frame verify_ahead() opened.
    if (!found && it->counter == counter && it->plaintext.size() + kSealOverhead == frame.size() &&
        std::memcmp(it->tag.data(), frame.data() + frame.size() - kTag, kTag) == 0) {
      out = std::move(it->plaintext);
      found = true;
    }
    it = ahead_.erase(it);  // this counter and older ones of the channel are done with
  }
  return found;
}

bool SecureLink::open(std::span<const uint8_t> frame, std::vector<uint8_t>& out, uint8_t& channel) {
  if (frame.size() < kSealOverhead || frame[0] != kSealed || frame[1] > kUnreliable) return false;
  channel = frame[1];
  const uint64_t counter = frame_counter(frame);
  // The window is checked before and updated only after the tag: forged frames cannot move it.
  if (!fresh(channel, counter)) return false;
  const bool ahead = channel != kUnreliable && !ahead_.empty() && take_ahead(frame, channel, counter, out);
  if (!ahead && !decrypt(frame, channel, counter, out)) return false;
  mark(channel, counter);
  return true;
}

void SecureLink::seal(Delivery delivery, std::span<const uint8_t> message, std::vector<uint8_t>& frame) {
  require(state_ == State::established, "edge.send", "the link is not established");
  const uint8_t channel = uint8_t(delivery);
  const uint64_t counter = send_counter_[channel]++;
  // 2^64 messages are out of reach; the check keeps a wrapped counter from ever reusing a nonce.
  require(counter < UINT64_MAX - 1, "edge.send", "message counter exhausted: reconnect");
  frame.resize(kSealOverhead + message.size());
  frame[0] = kSealed;
  frame[1] = channel;
  for (int i = 0; i < 8; ++i) frame[2 + i] = uint8_t(counter >> (8 * i));
  uint8_t nonce[crypto_aead_chacha20poly1305_ietf_NPUBBYTES];
  make_nonce(channel, counter, nonce);
  unsigned long long n = 0;
  if (suite_ == Suite::aes256gcm) {
    crypto_aead_aes256gcm_encrypt_afternm(frame.data() + kSealHeader, &n, message.data(), message.size(),
                                          frame.data(), kSealHeader, nullptr, nonce, gcm(send_state_));
  } else {
    crypto_aead_chacha20poly1305_ietf_encrypt(frame.data() + kSealHeader, &n, message.data(), message.size(),
                                              frame.data(), kSealHeader, nullptr, nonce, send_key_.data());
  }
}

}  // namespace halo::edge
