#include "halo/edge/transport.hpp"

#include <time.h>

#include "src/edge/transports.hpp"

namespace halo::edge {

double now() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

std::unique_ptr<Transport> Transport::create(Protocol protocol, const std::string& bind_host, uint16_t port,
                                             int32_t max_peers) {
  if (protocol == Protocol::tcp) return make_tcp_transport(bind_host, port, max_peers);
  return make_enet_transport(bind_host, port, max_peers);
}

}  // namespace halo::edge
