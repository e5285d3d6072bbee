// Factories of the two transport implementations (private to src/edge). The
// options arrive checked (key empty or 32 bytes, max_message_bytes > 0).
#pragma once

#include <memory>
#include <string>

#include "halo/edge/transport.hpp"

namespace halo::edge {

// Seconds a peer may take to finish the handshake before its slot is freed.
inline constexpr double kHandshakeTimeout = 5.0;
// Handshakes in progress at once (beyond them, new peers are turned away): a flood of
// unauthenticated peers holds at most this many slots, each for at most kHandshakeTimeout.
inline constexpr int32_t kPendingHandshakes = 16;

std::unique_ptr<Transport> make_enet_transport(const std::string& bind_host, uint16_t port, int32_t max_peers,
                                               const TransportOptions& options);
std::unique_ptr<Transport> make_tcp_transport(const std::string& bind_host, uint16_t port, int32_t max_peers,
                                              const TransportOptions& options);

}  // namespace halo::edge
