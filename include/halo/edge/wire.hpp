// The edge runtime's wire protocol (version kWireVersion): every message is a
// 32-byte little-endian header followed by a payload whose layout the header's
// kind fixes:
//   control  UTF-8 JSON (handshake, plans, acknowledgements, errors)
//   input    `count` uint16 critical group ids, then rows x cols float16: the
//            layer input the root broadcasts for one exchange
//   partial  rows x cols float16: rows [row0, row0 + rows) of one group's
//            additive output term
//   parity   forward error correction over `count` partials of one exchange that
//            share step, pos, layer, part, rows and cols (a parity set): `count`
//            members (uint16 group, uint16 row0), then the XOR of their rows x cols
//            float16 payloads, bit for bit. `group` is the set's id within the
//            exchange; 1 <= count <= kFecMaxK. A receiver holding all members but
//            one rebuilds that one exactly (parity_xor); two missing stay missing.
// A receiver checks the magic and size with decode(); the version is compared
// by the caller so it can answer a mismatch with a readable error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace halo::edge {

inline constexpr uint32_t kMagic = 0x454F4C48;  // "HLOE" in memory order
inline constexpr uint16_t kWireVersion = 1;
inline constexpr size_t kHeaderBytes = 32;
inline constexpr uint32_t kFecMaxK = 16;  // most partials one parity message covers

enum class Kind : uint8_t { control = 1, input = 2, partial = 3, parity = 4 };

// Header flags.
inline constexpr uint8_t kFlagReplay = 1;     // input: rebuild the key/value cache only, send nothing back
inline constexpr uint8_t kFlagDuplicate = 2;  // partial: an extra unreliable copy of a reliable message

struct Header {
  uint16_t version = kWireVersion;
  Kind kind = Kind::control;
  uint8_t flags = 0;
  uint32_t step = 0;   // exchange id, increasing within a session
  uint32_t pos = 0;    // token position of the first row
  uint16_t layer = 0;
  uint8_t part = 0;    // 0 attention, 1 feed-forward
  uint16_t group = 0;  // group index within (layer, part)
  uint16_t row0 = 0;
  uint16_t rows = 0;
  uint16_t cols = 0;
  uint32_t count = 0;  // input: number of critical group ids; parity: members
};

void encode_header(const Header& header, uint8_t* out);
// Throws FormatError naming `function` on a short message, a bad magic or a
// payload whose size disagrees with the header. The version is not checked.
Header decode_header(std::span<const uint8_t> message, const char* function = "edge.decode");

// Bytes of a whole message of this header (header + payload).
size_t message_bytes(const Header& header);

// `version` other than kWireVersion only to test how peers refuse a mismatch.
std::vector<uint8_t> make_control(std::span<const uint8_t> json, uint16_t version = kWireVersion);
// rows x cols float32 -> an input message (values rounded to float16).
std::vector<uint8_t> make_input(Header header, std::span<const uint16_t> critical, const float* rows);
std::vector<uint8_t> make_partial(Header header, const float* rows);

// One member of a parity set: the partial of `group` starting at `row0`.
struct ParityMember {
  uint16_t group = 0;
  uint16_t row0 = 0;
  bool operator==(const ParityMember&) const = default;
};

// The parity message of `members` (whole partial messages). Throws FormatError naming
// edge.make_parity unless they are 1..kFecMaxK decodable partials of one exchange
// (step, pos, layer, part) with equal rows and cols and distinct (group, row0).
std::vector<uint8_t> make_parity(uint16_t set, std::span<const std::span<const uint8_t>> members);
// The members of a parity message (header from decode_header).
std::vector<ParityMember> parity_members(const Header& header, std::span<const uint8_t> message);
// The float16 payload of a partial or parity message, as bytes (2 x rows x cols).
std::span<const uint8_t> payload_bytes(const Header& header, std::span<const uint8_t> message);

// The critical group ids of an input message (header from decode_header).
std::vector<uint16_t> critical_ids(const Header& header, std::span<const uint8_t> message);
// The JSON text of a control message.
std::span<const uint8_t> control_json(std::span<const uint8_t> message);

// float16 payload of a message -> float32 (rows x cols values).
void payload_to_float(const Header& header, std::span<const uint8_t> message, float* out);

}  // namespace halo::edge
