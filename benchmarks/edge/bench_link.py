"""Cost of sealing the edge links (issue 22): keyed (libsodium handshake + ChaCha20-Poly1305
frames) against plaintext transports, on loopback, in one thread, with messages the size of
one partial (a group term cut to one ENet datagram).

    python benchmarks/edge/bench_link.py [--rounds 15]

* round trip: a message there and back (two seals, two opens when keyed), per message;
* one way: bursts of 50 messages (ENet unreliable, TCP) drained on the other side, messages/s.
Keyed and plaintext pairs run interleaved (A, B, A, B, ...); min / median over the rounds and
the keyed/plaintext ratio of the medians. Loopback has no wire time, so the added latency here
is the whole cost of sealing plus the frame's 26 bytes, an upper bound of its share on a link.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import interleaved  # noqa: E402

from halo._core import edge  # noqa: E402

SIZE = 1300  # bytes: a partial message filling one keyed ENet datagram (datagram_payload 1334)
ROUND_TRIPS = 200
BURSTS, BURST = 20, 50


def wait_message(t: edge.Transport, timeout: float = 2.0) -> tuple[int, bytes]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        e = t.poll(0.5)
        if e is not None and e[0] == "message":
            return e[1], e[2]
    raise RuntimeError("bench_link: a message did not arrive within 2 s")


def pair(protocol: str, key: bytes | None) -> tuple[edge.Transport, edge.Transport, int, int]:
    server = edge.Transport(protocol, "127.0.0.1", 0, 2, key=key)
    client = edge.Transport(protocol, "", 0, 2, key=key)
    seen: list[int] = []

    def accept() -> None:  # the server must answer while connect() waits
        end = time.monotonic() + 5
        while not seen and time.monotonic() < end:
            e = server.poll(0.01)
            if e is not None and e[0] == "connect":
                seen.append(e[1])

    thread = threading.Thread(target=accept)
    thread.start()
    peer = client.connect("127.0.0.1", server.port, 5.0)
    client.flush()  # plaintext enet: the acknowledgement that makes the server see us
    thread.join()
    return server, client, seen[0], peer


def round_trips(server, client, speer, cpeer, delivery):
    data = os.urandom(SIZE)

    def run() -> None:
        for _ in range(ROUND_TRIPS):
            client.send(cpeer, data, delivery)
            client.flush()
            _, got = wait_message(server)
            server.send(speer, got, delivery)
            server.flush()
            wait_message(client)

    return run


def one_way(server, client, speer, cpeer, delivery):
    data = os.urandom(SIZE)

    def run() -> None:
        for _ in range(BURSTS):
            for _ in range(BURST):
                client.send(cpeer, data, delivery)
            client.flush()
            for _ in range(BURST):
                wait_message(server)
            client.poll(0)  # acknowledgements

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    flags = ""
    if Path("/proc/cpuinfo").exists():
        words = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
        flags = " ".join(f for f in ("avx2", "avx512f", "aes", "sha_ni") if f in words)
    print(f"{platform.processor() or platform.machine()}; cpu flags: {flags}; load {os.getloadavg()[0]:.1f}")
    print(f"message {SIZE} bytes; round trip: {ROUND_TRIPS} per sample; one way: {BURSTS} x {BURST} per sample")
    key = edge.keygen()
    print(f"{'protocol':8} {'measure':22} {'plaintext min/med':>18} {'keyed min/med':>18} {'keyed/plain (median)':>20}")
    for protocol, delivery in (("enet", "unreliable"), ("tcp", "control")):
        plain, keyed = pair(protocol, None), pair(protocol, key)
        t = interleaved(
            {
                "rtt plain": round_trips(*plain, delivery),
                "rtt keyed": round_trips(*keyed, delivery),
                "way plain": one_way(*plain, delivery),
                "way keyed": one_way(*keyed, delivery),
            },
            repeats=args.rounds,
        )
        us = 1e6 / ROUND_TRIPS
        p, k = t["rtt plain"], t["rtt keyed"]
        print(
            f"{protocol:8} {'round trip, us/message':22} {p.min * us:8.1f}/{p.median * us:<8.1f} "
            f"{k.min * us:8.1f}/{k.median * us:<8.1f} {k.median / p.median:20.3f}"
        )
        n = BURSTS * BURST
        p, k = t["way plain"], t["way keyed"]
        print(
            f"{protocol:8} {'one way, messages/s':22} {n / p.min:8.0f}/{n / p.median:<8.0f} "
            f"{n / k.min:8.0f}/{n / k.median:<8.0f} {p.median / k.median:20.3f}"
        )
        added = (t["rtt keyed"].median - t["rtt plain"].median) / ROUND_TRIPS / 2 * 1e6
        print(f"{protocol:8} added per message (one seal + one open, median): {added:.1f} us")
    print(f"load after: {os.getloadavg()[0]:.1f} (shared machine: other jobs ran meanwhile)")


if __name__ == "__main__":
    main()
