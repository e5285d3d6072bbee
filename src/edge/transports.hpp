// Factories of the two transport implementations (private to src/edge).
#pragma once

#include <memory>
#include <string>

#include "halo/edge/transport.hpp"

namespace halo::edge {

std::unique_ptr<Transport> make_enet_transport(const std::string& bind_host, uint16_t port, int32_t max_peers);
std::unique_ptr<Transport> make_tcp_transport(const std::string& bind_host, uint16_t port, int32_t max_peers);

}  // namespace halo::edge
