// Fuzz target: a worker's message handling — the server end of a SecureLink (handshake,
// sealed receive, replay windows) and the wire parser behind it.
//
// The input is a program of operations on a legitimate client link and the server link
// under test: raw (attacker) frames, honest handshake steps, messages sealed by the
// client and delivered now or held back, held frames delivered late (reordered),
// replays and tampered copies of frames already sent, bursts that move the window.
// Properties, against an independent model (sets of accepted counters, not the
// link's bitmap): nothing but the handshake is answered before the peer proved the key;
// a sealed frame is accepted exactly when it is authentic and fresh (reliable channels:
// not below the next counter; unreliable: never seen and at most 1024 behind the
// newest); an accepted frame opens to exactly what was sealed; a tampered frame is
// refused; the wire parser only ever returns a consistent header or throws FormatError.
#include <map>
#include <set>

#include "fuzz.hpp"
#include "halo/core/error.hpp"
#include "halo/edge/link.hpp"
#include "halo/edge/wire.hpp"

namespace {

using halo::fuzz::Bytes;
using halo::fuzz::Failure;
using namespace halo::edge;
using Result = SecureLink::Result;

const std::vector<uint8_t> kKey(32, 0x5A);

struct Sent {
  std::vector<uint8_t> frame, message;
  uint8_t channel = 0;
  uint64_t counter = 0;
};

// The independent model of which counters the server must accept.
struct Model {
  std::map<uint8_t, std::set<uint64_t>> accepted;
  bool fresh(uint8_t channel, uint64_t counter) const {
    auto it = accepted.find(channel);
    if (it == accepted.end() || it->second.empty()) return true;
    const uint64_t newest = *it->second.rbegin();
    if (channel != uint8_t(Delivery::unreliable)) return counter > newest;
    if (it->second.count(counter)) return false;
    return counter > newest || newest - counter < kReplayWindow;
  }
};

void parse_wire(const std::vector<uint8_t>& m) {
  try {
    const Header h = decode_header(m, "fuzz");
    if (h.version != kWireVersion) return;
    if (message_bytes(h) != m.size()) throw Failure("decode_header accepted a size that disagrees with its header");
    (void)critical_ids(h, m);
    if (h.kind != Kind::control) {
      std::vector<float> rows(size_t(h.rows) * h.cols);
      payload_to_float(h, m, rows.data());
    }
  } catch (const halo::FormatError&) {
  }
}

class Program {
 public:
  explicit Program(const Bytes& in) : in_(in) {}
  bool run() {
    SecureLink client(kKey, SecureLink::Role::client), server(kKey, SecureLink::Role::server);
    std::vector<Sent> sent;  // frames the client sealed (delivered or held)
    std::vector<bool> delivered;
    std::vector<uint64_t> counters(3, 0);
    Model model;
    std::vector<uint8_t> out;
    auto deliver = [&](size_t k) {
      const Sent& s = sent[k];
      const bool expect = model.fresh(s.channel, s.counter);
      const Result r = server.receive(s.frame, out);
      if ((r == Result::message) != expect) throw Failure("a sealed frame's acceptance disagrees with the model");
      if (r != Result::message) return;
      if (out != s.message) throw Failure("an accepted frame opened to other bytes than were sealed");
      model.accepted[s.channel].insert(s.counter);
      parse_wire(out);
    };
    while (more()) {
      const uint8_t op = byte() % 8;
      switch (op) {
        case 0: {  // an attacker's raw frame
          std::vector<uint8_t> frame = take(byte());
          const bool before = server.established();
          if (server.verify_ahead(frame) == before) throw Failure("verify_ahead misjudged an attacker's frame");
          const Result r = server.receive(frame, out);
          // No key, no valid frame: nothing the attacker writes is ever a message or a proof.
          if (r == Result::message) throw Failure(before ? "a forged frame was accepted"
                                                         : "a message was accepted before the handshake");
          if (r == Result::established) throw Failure("a proof without the key was accepted");
          break;
        }
        case 1: {  // the honest handshake, when neither side started
          if (!(fresh_client_ && !server.established())) break;
          fresh_client_ = false;
          std::vector<uint8_t> a, b;
          const Result r1 = server.receive(client.hello(), a);
          if (r1 != Result::handshake) break;  // the attacker spoiled the server's state first
          if (client.receive(a, b) != Result::handshake) throw Failure("the client refused an honest challenge");
          if (server.receive(b, a) != Result::established) throw Failure("the server refused an honest proof");
          if (client.receive(a, b) != Result::established) throw Failure("the client refused an honest READY");
          break;
        }
        case 2:
        case 3: {  // the client seals a message; case 3 holds it back
          if (!client.established()) break;
          const uint8_t channel = byte() % 3;
          Sent s;
          s.channel = channel;
          s.counter = counters[channel]++;
          s.message = take(byte());
          client.seal(Delivery(channel), s.message, s.frame);
          sent.push_back(std::move(s));
          delivered.push_back(op == 2);
          if (op == 2) deliver(sent.size() - 1);
          break;
        }
        case 4: {  // deliver (again, or for the first time: reordered) a frame sent before
          if (sent.empty()) break;
          const size_t k = byte() % sent.size();
          // ENet's intercept opens reliable frames ahead; delivery then takes the kept plaintext.
          if (sent[k].channel != uint8_t(Delivery::unreliable) && !server.verify_ahead(sent[k].frame))
            throw Failure("verify_ahead refused an authentic reliable frame");
          deliver(k);
          delivered[k] = true;
          break;
        }
        case 5: {  // a tampered copy: one bit flipped anywhere
          if (sent.empty()) break;
          Sent s = sent[byte() % sent.size()];
          const size_t bit = (size_t(byte()) << 8 | byte()) % (s.frame.size() * 8);
          s.frame[bit / 8] ^= uint8_t(1 << (bit % 8));
          if (server.verify_ahead(s.frame)) throw Failure("verify_ahead passed a tampered frame");
          if (server.receive(s.frame, out) != Result::refused) throw Failure("a tampered frame was accepted");
          break;
        }
        case 6: {  // a burst of unreliable messages that moves the window; every `gap`-th is lost
          if (!client.established()) break;
          const int n = 1 + byte() * 8, gap = 1 + byte() % 16;
          for (int i = 0; i < n; ++i) {
            Sent s;
            s.channel = uint8_t(Delivery::unreliable);
            s.counter = counters[s.channel]++;
            client.seal(Delivery::unreliable, {}, s.frame);
            sent.push_back(std::move(s));
            delivered.push_back(i % gap != gap - 1 || gap == 1);
            if (delivered.back()) deliver(sent.size() - 1);
          }
          break;
        }
        case 7: {  // deliver every frame not delivered yet, in order
          for (size_t k = 0; k < sent.size(); ++k)
            if (!delivered[k]) deliver(k), delivered[k] = true;
          break;
        }
      }
    }
    return server.established();
  }

 private:
  bool more() const { return at_ < in_.size(); }
  uint8_t byte() { return more() ? uint8_t(in_[at_++]) : 0; }
  std::vector<uint8_t> take(size_t n) {
    n = std::min(n, in_.size() - at_);
    std::vector<uint8_t> v(in_.begin() + std::ptrdiff_t(at_), in_.begin() + std::ptrdiff_t(at_ + n));
    at_ += n;
    return v;
  }
  const Bytes& in_;
  size_t at_ = 0;
  bool fresh_client_ = true;
};

Bytes control_message() {
  const std::string json = R"({"op":"hello"})";
  const auto m = make_control({reinterpret_cast<const uint8_t*>(json.data()), json.size()});
  return Bytes(m.begin(), m.end());
}

Bytes ops(std::initializer_list<int> bytes) {
  Bytes b;
  for (int v : bytes) b.push_back(char(v));
  return b;
}

std::vector<Bytes> seeds() {
  const Bytes msg = control_message();
  return {
      // handshake; hold two unreliable messages; deliver the second, the first, the second again
      ops({1, 3, 2, 1, 'a', 3, 2, 1, 'b', 4, 1, 4, 0, 4, 1}),
      // handshake; a control message delivered now; a tampered copy; a replay
      ops({1, 2, 0, int(msg.size())}) + msg + ops({5, 0, 0x10, 0x20, 4, 0}),
      // handshake; hold one; a burst of 1153 (every 6th lost) moves the window past it; deliver it (too old)
      ops({1, 3, 2, 0, 6, 144, 5, 4, 0, 7}),
      // an attacker's HELLO before the honest one
      ops({0, 40, 'H', 'L', 'K', '1', 1, 0, 0, 0}) + Bytes(32, 'n') + ops({1}),
      // an attacker's HELLO and a PROOF it cannot make
      ops({0, 40, 'H', 'L', 'K', '1', 1, 0, 0, 0}) + Bytes(32, 'n') + ops({0, 40, 'H', 'L', 'K', '1', 3, 0, 0, 0}) +
          Bytes(32, 'p') + ops({0, 26, 0x53, 0, 0, 0, 0, 0, 0, 0, 0, 0}) + Bytes(16, 't'),
  };
}

bool run_one(const Bytes& input) { return Program(input).run(); }

halo::fuzz::Register reg({"edge_link", 8000, 1000, seeds, run_one, nullptr});

}  // namespace
