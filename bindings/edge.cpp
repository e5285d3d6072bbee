// halo._core.edge: the edge runtime's transports (ENet / TCP), wire messages
// and the root's deadline-bounded gather. python/halo/edge_*.py drive them.
#include <cmath>
#include <optional>
#include <stdexcept>

#include "bindings/registry.hpp"
#include "halo/edge/exchange.hpp"
#include "halo/edge/link.hpp"
#include "halo/edge/transport.hpp"
#include "halo/edge/wire.hpp"

namespace halo::bindings {
namespace {

using namespace halo::edge;

Protocol parse_protocol(const std::string& name) {
  if (name == "enet") return Protocol::enet;
  if (name == "tcp") return Protocol::tcp;
  fail("edge.Transport", "protocol must be 'enet' or 'tcp', got '", name, "'");
}

Delivery parse_delivery(const std::string& name) {
  if (name == "control") return Delivery::control;
  if (name == "reliable") return Delivery::reliable;
  if (name == "unreliable") return Delivery::unreliable;
  fail("edge.send", "delivery must be 'control', 'reliable' or 'unreliable', got '", name, "'");
}

const char* event_name(Event::Type t) {
  switch (t) {
    case Event::Type::connect: return "connect";
    case Event::Type::message: return "message";
    case Event::Type::disconnect: return "disconnect";
    default: return "none";
  }
}

py::object event_tuple(Event& e) {
  if (e.type == Event::Type::none) return py::none();
  py::bytes data(reinterpret_cast<const char*>(e.data.data()), e.data.size());
  return py::make_tuple(event_name(e.type), e.peer, data, e.time);
}

// rows: a C-contiguous float32 [n, cols] array.
py::array_t<float, py::array::c_style | py::array::forcecast> rows_array(const char* fn, const py::handle& rows) {
  auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(rows);
  require(bool(a), fn, "rows must be convertible to a float32 array");
  require(a.ndim() == 2, fn, "rows must be 2-D [n, cols], got ", a.ndim(), "-D");
  require(a.shape(0) <= 65535 && a.shape(1) >= 1 && a.shape(1) <= 65535, fn, "rows shape [", a.shape(0), ", ",
          a.shape(1), "] out of range (at most 65535 each)");
  return a;
}

Header make_header(uint32_t step, uint32_t pos, int layer, int part, int group) {
  require(layer >= 0 && layer <= 65535 && part >= 0 && part <= 255 && group >= 0 && group <= 65535, "edge",
          "layer/part/group out of range: ", layer, "/", part, "/", group);
  Header h;
  h.step = step;
  h.pos = pos;
  h.layer = uint16_t(layer);
  h.part = uint8_t(part);
  h.group = uint16_t(group);
  return h;
}

py::dict decode(const py::bytes& message) {
  const std::string_view view = message;
  const std::span<const uint8_t> m(reinterpret_cast<const uint8_t*>(view.data()), view.size());
  const Header h = decode_header(m, "edge.decode");
  py::dict out;
  out["version"] = h.version;
  out["kind"] = h.kind == Kind::control ? "control"
                : h.kind == Kind::input ? "input"
                : h.kind == Kind::partial ? "partial"
                                          : "parity";
  if (h.version != kWireVersion) return out;
  out["flags"] = h.flags;
  out["step"] = h.step;
  out["pos"] = h.pos;
  out["layer"] = h.layer;
  out["part"] = h.part;
  out["group"] = h.group;
  out["row0"] = h.row0;
  if (h.kind == Kind::control) {
    const auto json = control_json(m);
    out["json"] = py::bytes(reinterpret_cast<const char*>(json.data()), json.size());
    return out;
  }
  if (h.kind == Kind::input) {
    const std::vector<uint16_t> ids = critical_ids(h, m);
    py::array_t<uint16_t> critical(py::ssize_t(ids.size()));
    std::copy(ids.begin(), ids.end(), critical.mutable_data());
    out["critical"] = critical;
  }
  if (h.kind == Kind::parity) {  // group: the set id; members (group, row0); the XOR as bytes
    py::list members;
    for (const ParityMember& p : parity_members(h, m)) members.append(py::make_tuple(p.group, p.row0));
    out["members"] = members;
    const auto bits = payload_bytes(h, m);
    out["xor"] = py::bytes(reinterpret_cast<const char*>(bits.data()), bits.size());
    out["rows"] = h.rows;
    out["cols"] = h.cols;
    return out;
  }
  py::array_t<float> rows({py::ssize_t(h.rows), py::ssize_t(h.cols)});
  payload_to_float(h, m, rows.mutable_data());
  out["rows"] = rows;
  return out;
}

void bind(py::module_& m) {
  m.attr("WIRE_VERSION") = kWireVersion;
  m.def("now", &now, "CLOCK_MONOTONIC seconds (time.monotonic()'s clock).");
  m.def(
      "make_control",
      [](const py::bytes& json, int version) {
        require(version >= 0 && version <= 65535, "edge.make_control", "version must be in [0, 65535], got ",
                version);
        const std::string_view v = json;
        const auto msg = make_control({reinterpret_cast<const uint8_t*>(v.data()), v.size()}, uint16_t(version));
        return py::bytes(reinterpret_cast<const char*>(msg.data()), msg.size());
      },
      py::arg("json"), py::arg("version") = kWireVersion);
  m.def("decode", &decode, py::arg("message"));
  m.def(
      "make_partial",
      [](uint32_t step, uint32_t pos, int layer, int part, int group, int row0, const py::handle& rows) {
        auto a = rows_array("edge.make_partial", rows);
        require(row0 >= 0 && row0 <= 65535, "edge.make_partial", "row0 must be in [0, 65535], got ", row0);
        Header h = make_header(step, pos, layer, part, group);
        h.row0 = uint16_t(row0);
        h.rows = uint16_t(a.shape(0));
        h.cols = uint16_t(a.shape(1));
        const auto msg = make_partial(h, a.data());
        return py::bytes(reinterpret_cast<const char*>(msg.data()), msg.size());
      },
      py::arg("step"), py::arg("pos"), py::arg("layer"), py::arg("part"), py::arg("group"), py::arg("row0"),
      py::arg("rows"), "One partial message (rows x cols float32 rounded to float16), as send_partial cuts them.");
  m.def(
      "make_parity",
      [](int set, const std::vector<py::bytes>& members) {
        require(set >= 0 && set <= 65535, "edge.make_parity", "set must be in [0, 65535], got ", set);
        std::vector<std::string> keep(members.begin(), members.end());
        std::vector<std::span<const uint8_t>> spans;
        for (const std::string& k : keep) spans.emplace_back(reinterpret_cast<const uint8_t*>(k.data()), k.size());
        const auto msg = make_parity(uint16_t(set), spans);
        return py::bytes(reinterpret_cast<const char*>(msg.data()), msg.size());
      },
      py::arg("set"), py::arg("members"), "The parity message of partial messages of one exchange and shape.");
  m.attr("FEC_MAX_K") = kFecMaxK;
  m.def(
      "keygen",
      [] {
        const std::vector<uint8_t> key = keygen();
        return py::bytes(reinterpret_cast<const char*>(key.data()), key.size());
      },
      "32 random bytes from libsodium: a key for Transport(..., key=...).");
  m.def("aes256gcm_available", &aes256gcm_available,
        "Whether sealed links can use AES-256-GCM here (AES-NI and PCLMUL); else ChaCha20-Poly1305.");

  py::class_<Transport>(m, "Transport")
      .def(py::init([](const std::string& protocol, const std::string& host, int port, int max_peers,
                       const std::optional<py::bytes>& key, int64_t max_message_bytes, bool aes) {
             require(port >= 0 && port <= 65535, "edge.Transport", "port must be in [0, 65535], got ", port);
             require(max_message_bytes > 0, "edge.Transport", "max_message_bytes must be > 0, got ",
                     max_message_bytes);
             TransportOptions options;
             if (key) {
               const std::string_view k = *key;
               options.key.assign(k.begin(), k.end());
               require(options.key.size() == kKeyBytes, "edge.Transport", "key must be ", kKeyBytes,
                       " bytes, got ", options.key.size());
             }
             options.max_message_bytes = size_t(max_message_bytes);
             options.aes = aes;
             return Transport::create(parse_protocol(protocol), host, uint16_t(port), max_peers, options);
           }),
           py::arg("protocol"), py::arg("host") = "", py::arg("port") = 0, py::arg("max_peers") = 8,
           py::arg("key") = py::none(), py::arg("max_message_bytes") = int64_t(64) << 20, py::arg("aes") = true)
      .def_property_readonly("protocol",
                             [](const Transport& t) { return t.protocol() == Protocol::enet ? "enet" : "tcp"; })
      .def_property_readonly("port", &Transport::port)
      .def_property_readonly("datagram_payload", &Transport::datagram_payload)
      .def_property_readonly("auth_failures", &Transport::auth_failures)
      .def(
          "connect",
          [](Transport& t, const std::string& host, int port, double timeout) {
            require(port > 0 && port <= 65535, "edge.connect", "port must be in [1, 65535], got ", port);
            require(timeout >= 0 && timeout < 1e6, "edge.connect", "timeout must be in [0, 1e6) s, got ", timeout);
            try {
              py::gil_scoped_release release;
              return t.connect(host, uint16_t(port), timeout);
            } catch (const std::runtime_error& e) {
              PyErr_SetString(PyExc_ConnectionError, e.what());
              throw py::error_already_set();
            }
          },
          py::arg("host"), py::arg("port"), py::arg("timeout"))
      .def(
          "send",
          [](Transport& t, int32_t peer, const py::bytes& data, const std::string& delivery) {
            const std::string_view v = data;
            return t.send(peer, {reinterpret_cast<const uint8_t*>(v.data()), v.size()}, parse_delivery(delivery));
          },
          py::arg("peer"), py::arg("data"), py::arg("delivery"))
      .def("flush", &Transport::flush)
      .def(
          "poll",
          [](Transport& t, double timeout) {
            require(timeout >= 0 && timeout < 1e6, "edge.poll", "timeout must be in [0, 1e6) s, got ", timeout);
            Event e;
            {
              py::gil_scoped_release release;
              e = t.poll(timeout);
            }
            return event_tuple(e);
          },
          py::arg("timeout"))
      .def("disconnect", &Transport::disconnect, py::arg("peer"), py::arg("now") = true)
      .def("connected", &Transport::connected, py::arg("peer"))
      .def(
          "stats",
          [](const Transport& t, int32_t peer) {
            const PeerStats s = t.stats(peer);
            py::dict d;
            d["rtt"] = s.rtt;
            d["rtt_var"] = s.rtt_var;
            d["retransmits"] = s.retransmits;
            d["loss"] = s.loss;
            return d;
          },
          py::arg("peer"))
      .def(
          "send_input",
          [](Transport& t, int32_t peer, uint32_t step, uint32_t pos, int layer, int part,
             const std::vector<uint16_t>& critical, const py::handle& rows, const std::string& delivery, int flags) {
            auto a = rows_array("edge.send_input", rows);
            Header h = make_header(step, pos, layer, part, 0);
            h.rows = uint16_t(a.shape(0));
            h.cols = uint16_t(a.shape(1));
            h.flags = uint8_t(flags);
            return send_input(t, peer, h, critical, a.data(), parse_delivery(delivery));
          },
          py::arg("peer"), py::arg("step"), py::arg("pos"), py::arg("layer"), py::arg("part"), py::arg("critical"),
          py::arg("rows"), py::arg("delivery") = "control", py::arg("flags") = 0)
      .def(
          "send_partial",
          [](Transport& t, int32_t peer, uint32_t step, uint32_t pos, int layer, int part, int group,
             const py::handle& rows, const std::string& delivery, bool duplicate) {
            auto a = rows_array("edge.send_partial", rows);
            Header h = make_header(step, pos, layer, part, group);
            h.cols = uint16_t(a.shape(1));
            return send_partial(t, peer, h, a.data(), int32_t(a.shape(0)), parse_delivery(delivery), duplicate);
          },
          py::arg("peer"), py::arg("step"), py::arg("pos"), py::arg("layer"), py::arg("part"), py::arg("group"),
          py::arg("rows"), py::arg("delivery"), py::arg("duplicate") = false)
      .def(
          "send_partials",
          [](Transport& t, int32_t peer, uint32_t step, uint32_t pos, int layer, int part,
             const std::vector<int>& groups, py::array_t<float, py::array::c_style | py::array::forcecast> rows,
             const std::string& delivery, int fec) {
            constexpr const char* fn = "edge.send_partials";
            require(rows.ndim() == 3 && size_t(rows.shape(0)) == groups.size(), fn,
                    "rows must be float32 [groups, n, cols] with one block per group id");
            require(rows.shape(1) <= 65535 && rows.shape(2) >= 1 && rows.shape(2) <= 65535, fn, "rows shape [",
                    rows.shape(0), ", ", rows.shape(1), ", ", rows.shape(2), "] out of range");
            std::vector<uint16_t> ids;
            for (int g : groups) ids.push_back(make_header(step, pos, layer, part, g).group);
            const Header h = make_header(step, pos, layer, part, 0);
            return send_partials(t, peer, h, ids, rows.data(), int32_t(rows.shape(1)), int32_t(rows.shape(2)),
                                 parse_delivery(delivery), fec);
          },
          py::arg("peer"), py::arg("step"), py::arg("pos"), py::arg("layer"), py::arg("part"), py::arg("groups"),
          py::arg("rows"), py::arg("delivery"), py::arg("fec") = 0)
      .def(
          "gather",
          [](Transport& t, uint32_t step, int layer, int part, py::array_t<float, py::array::c_style> out,
             const std::vector<int32_t>& peer_of_group, const std::vector<uint8_t>& critical, double deadline,
             double hard_deadline, bool wait_all, bool fec) {
            constexpr const char* fn = "edge.gather";
            require(out.ndim() == 3 && size_t(out.shape(0)) == peer_of_group.size(), fn,
                    "out must be float32 [groups, rows, cols] with one row block per group");
            require(out.writeable(), fn, "out must be writable");
            require(std::isfinite(deadline) && std::isfinite(hard_deadline), fn, "deadlines must be finite");
            GatherSpec spec;
            Header h = make_header(step, 0, layer, part, 0);
            spec.step = step;
            spec.layer = h.layer;
            spec.part = h.part;
            spec.rows = int32_t(out.shape(1));
            spec.cols = int32_t(out.shape(2));
            spec.peer_of_group = peer_of_group;
            spec.critical = critical;
            spec.deadline = deadline;
            spec.hard_deadline = std::max(deadline, hard_deadline);
            spec.wait_all = wait_all;
            spec.fec = fec;
            float* data = out.mutable_data();
            GatherResult r;
            {
              py::gil_scoped_release release;
              r = gather(t, spec, data);
            }
            py::dict d;
            d["end"] = r.end == GatherResult::End::complete   ? "complete"
                       : r.end == GatherResult::End::deadline ? "deadline"
                                                              : "hard_deadline";
            py::array_t<uint8_t> received({py::ssize_t(peer_of_group.size()), py::ssize_t(spec.rows)});
            std::copy(r.received.begin(), r.received.end(), received.mutable_data());
            d["received"] = received;
            d["peer_last"] = r.peer_last;
            d["peer_heard"] = r.peer_heard;
            d["peer_missing"] = r.peer_missing;
            py::list other;
            for (Event& e : r.other) other.append(event_tuple(e));
            d["other"] = other;
            d["stale"] = r.stale;
            py::list late;
            for (const LateArrival& a : r.late) late.append(py::make_tuple(a.step, a.group, a.peer, a.time));
            d["late"] = late;
            d["duplicates"] = r.duplicates;
            d["malformed"] = r.malformed;
            py::array_t<uint8_t> rebuilt({py::ssize_t(peer_of_group.size()), py::ssize_t(spec.rows)});
            if (r.rebuilt.empty())
              std::fill_n(rebuilt.mutable_data(), rebuilt.size(), uint8_t(0));
            else
              std::copy(r.rebuilt.begin(), r.rebuilt.end(), rebuilt.mutable_data());
            d["rebuilt"] = rebuilt;
            d["parity"] = r.parity;
            d["parity_refused"] = r.parity_refused;
            d["end_time"] = r.end_time;
            return d;
          },
          py::arg("step"), py::arg("layer"), py::arg("part"), py::arg("out"), py::arg("peer_of_group"),
          py::arg("critical"), py::arg("deadline"), py::arg("hard_deadline"), py::arg("wait_all") = false,
          py::arg("fec") = false);
}

Registrar registrar("edge", bind);

}  // namespace
}  // namespace halo::bindings
