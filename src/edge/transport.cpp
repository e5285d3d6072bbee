#include "halo/edge/transport.hpp"

#include <time.h>

#include "halo/core/error.hpp"
#include "halo/edge/link.hpp"
#include "src/edge/transports.hpp"

namespace halo::edge {

double now() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

std::unique_ptr<Transport> Transport::create(Protocol protocol, const std::string& bind_host, uint16_t port,
                                             int32_t max_peers, const TransportOptions& options) {
  require(options.key.empty() || options.key.size() == kKeyBytes, "edge.Transport", "key must be ", kKeyBytes,
          " bytes (or empty for an insecure transport), got ", options.key.size());
  require(options.max_message_bytes > 0 && options.max_message_bytes <= (size_t(1) << 32) - 1 - kSealOverhead,
          "edge.Transport", "max_message_bytes must be in [1, 2^32 - 27], got ", options.max_message_bytes);
  if (protocol == Protocol::tcp) return make_tcp_transport(bind_host, port, max_peers, options);
  return make_enet_transport(bind_host, port, max_peers, options);
}

}  // namespace halo::edge
