#include "halo/edge/wire.hpp"

#include <cstring>

#include "halo/core/convert.hpp"
#include "halo/core/error.hpp"

namespace halo::edge {

namespace {

// Explicit little-endian stores and loads: the wire order does not depend on the host.
void put16(uint8_t* p, uint16_t v) {
  p[0] = uint8_t(v);
  p[1] = uint8_t(v >> 8);
}
void put32(uint8_t* p, uint32_t v) {
  put16(p, uint16_t(v));
  put16(p + 2, uint16_t(v >> 16));
}
uint16_t get16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
uint32_t get32(const uint8_t* p) { return uint32_t(get16(p)) | (uint32_t(get16(p + 2)) << 16); }

size_t payload_offset(const Header& h) {
  if (h.kind == Kind::input) return kHeaderBytes + 2 * size_t(h.count);
  if (h.kind == Kind::parity) return kHeaderBytes + 4 * size_t(h.count);
  return kHeaderBytes;
}

void encode_rows(const Header& h, const float* rows, uint8_t* out) {
  const size_t n = size_t(h.rows) * h.cols;
  for (size_t i = 0; i < n; ++i) put16(out + 2 * i, float_to_f16(rows[i]));
}

}  // namespace

void encode_header(const Header& h, uint8_t* out) {
  put32(out, kMagic);
  put16(out + 4, h.version);
  out[6] = uint8_t(h.kind);
  out[7] = h.flags;
  put32(out + 8, h.step);
  put32(out + 12, h.pos);
  put16(out + 16, h.layer);
  out[18] = h.part;
  out[19] = 1;  // payload element type: float16 (the only one so far)
  put16(out + 20, h.group);
  put16(out + 22, h.row0);
  put16(out + 24, h.rows);
  put16(out + 26, h.cols);
  put32(out + 28, h.count);
}

size_t message_bytes(const Header& h) {
  if (h.kind == Kind::control) return kHeaderBytes + h.count;
  return payload_offset(h) + 2 * size_t(h.rows) * h.cols;
}

Header decode_header(std::span<const uint8_t> m, const char* fn) {
  require<FormatError>(m.size() >= kHeaderBytes, fn, "message of ", m.size(), " bytes is shorter than the ",
                       kHeaderBytes, "-byte header");
  const uint32_t magic = get32(m.data());
  require<FormatError>(magic == kMagic, fn, "not a halo edge message (magic 0x", std::hex, magic, ")");
  Header h;
  h.version = get16(m.data() + 4);
  if (h.version != kWireVersion) {
    h.kind = Kind(m[6]);  // the caller reports the mismatch; do not interpret the rest
    return h;
  }
  const uint8_t kind = m[6];
  require<FormatError>(kind >= 1 && kind <= 4, fn, "unknown message kind ", int(kind));
  h.kind = Kind(kind);
  h.flags = m[7];
  h.step = get32(m.data() + 8);
  h.pos = get32(m.data() + 12);
  h.layer = get16(m.data() + 16);
  h.part = m[18];
  require<FormatError>(h.kind == Kind::control || m[19] == 1, fn, "unknown payload element type ", int(m[19]));
  h.group = get16(m.data() + 20);
  h.row0 = get16(m.data() + 22);
  h.rows = get16(m.data() + 24);
  h.cols = get16(m.data() + 26);
  h.count = get32(m.data() + 28);
  if (h.kind == Kind::control) h.count = uint32_t(m.size() - kHeaderBytes);
  if (h.kind == Kind::parity)  // bounded before any size is computed from it
    require<FormatError>(h.count >= 1 && h.count <= kFecMaxK && h.rows >= 1 && h.cols >= 1, fn, "parity of ",
                         h.count, " members of ", h.rows, " x ", h.cols, " values (1 to ", kFecMaxK,
                         " members of at least 1 x 1)");
  require<FormatError>(m.size() == message_bytes(h), fn, "message of ", m.size(), " bytes, header says ",
                       message_bytes(h), " (", h.rows, " x ", h.cols, " values, ", h.count, " ids)");
  return h;
}

std::vector<uint8_t> make_control(std::span<const uint8_t> json, uint16_t version) {
  Header h;
  h.version = version;
  h.kind = Kind::control;
  h.count = uint32_t(json.size());
  std::vector<uint8_t> out(kHeaderBytes + json.size());
  encode_header(h, out.data());
  if (!json.empty()) std::memcpy(out.data() + kHeaderBytes, json.data(), json.size());
  return out;
}

std::vector<uint8_t> make_input(Header h, std::span<const uint16_t> critical, const float* rows) {
  h.kind = Kind::input;
  h.count = uint32_t(critical.size());
  std::vector<uint8_t> out(message_bytes(h));
  encode_header(h, out.data());
  for (size_t i = 0; i < critical.size(); ++i) put16(out.data() + kHeaderBytes + 2 * i, critical[i]);
  encode_rows(h, rows, out.data() + payload_offset(h));
  return out;
}

std::vector<uint8_t> make_partial(Header h, const float* rows) {
  h.kind = Kind::partial;
  h.count = 0;
  std::vector<uint8_t> out(message_bytes(h));
  encode_header(h, out.data());
  encode_rows(h, rows, out.data() + kHeaderBytes);
  return out;
}

std::vector<uint8_t> make_parity(uint16_t set, std::span<const std::span<const uint8_t>> members) {
  constexpr const char* fn = "edge.make_parity";
  require<FormatError>(!members.empty() && members.size() <= kFecMaxK, fn, "a parity set has 1 to ", kFecMaxK,
                       " members, got ", members.size());
  const Header first = decode_header(members[0], fn);
  Header h = first;
  h.kind = Kind::parity;
  h.flags = 0;
  h.group = set;
  h.row0 = 0;
  h.count = uint32_t(members.size());
  std::vector<uint8_t> out(message_bytes(h), 0);
  encode_header(h, out.data());
  uint8_t* x = out.data() + payload_offset(h);
  for (size_t i = 0; i < members.size(); ++i) {
    const Header m = decode_header(members[i], fn);
    require<FormatError>(m.version == kWireVersion && m.kind == Kind::partial, fn, "member ", i,
                         " is not a partial of this wire version");
    require<FormatError>(m.step == first.step && m.pos == first.pos && m.layer == first.layer &&
                             m.part == first.part && m.rows == first.rows && m.cols == first.cols,
                         fn, "member ", i, " (", m.rows, " x ", m.cols, " values of step ", m.step,
                         ") differs from member 0 (", first.rows, " x ", first.cols, " values of step ",
                         first.step, "): a parity set shares one exchange and one shape");
    for (size_t j = 0; j < i; ++j)
      require<FormatError>(get16(out.data() + kHeaderBytes + 4 * j) != m.group ||
                               get16(out.data() + kHeaderBytes + 4 * j + 2) != m.row0,
                           fn, "member ", i, " repeats group ", m.group, " row ", m.row0);
    put16(out.data() + kHeaderBytes + 4 * i, m.group);
    put16(out.data() + kHeaderBytes + 4 * i + 2, m.row0);
    const std::span<const uint8_t> p = payload_bytes(m, members[i]);
    for (size_t b = 0; b < p.size(); ++b) x[b] ^= p[b];
  }
  return out;
}

std::vector<ParityMember> parity_members(const Header& h, std::span<const uint8_t> m) {
  std::vector<ParityMember> out(h.kind == Kind::parity ? h.count : 0);
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = ParityMember{get16(m.data() + kHeaderBytes + 4 * i), get16(m.data() + kHeaderBytes + 4 * i + 2)};
  return out;
}

std::span<const uint8_t> payload_bytes(const Header& h, std::span<const uint8_t> m) {
  return m.subspan(payload_offset(h), 2 * size_t(h.rows) * h.cols);
}

std::vector<uint16_t> critical_ids(const Header& h, std::span<const uint8_t> m) {
  std::vector<uint16_t> ids(h.kind == Kind::input ? h.count : 0);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = get16(m.data() + kHeaderBytes + 2 * i);
  return ids;
}

std::span<const uint8_t> control_json(std::span<const uint8_t> m) { return m.subspan(kHeaderBytes); }

void payload_to_float(const Header& h, std::span<const uint8_t> m, float* out) {
  const uint8_t* p = m.data() + payload_offset(h);
  const size_t n = size_t(h.rows) * h.cols;
  for (size_t i = 0; i < n; ++i) out[i] = f16_to_float(get16(p + 2 * i));
}

}  // namespace halo::edge
