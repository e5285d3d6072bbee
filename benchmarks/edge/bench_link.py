"""Cost of sealing the edge links (issue 22): keyed (libsodium handshake + ChaCha20-Poly1305
frames) against plaintext transports, on loopback, in one thread, with messages the size of
one partial (a group term cut to one ENet datagram).

    python benchmarks/edge/bench_link.py [--rounds 15]

* round trip: a message there and back (two seals, two opens when keyed), per message;
* one way: bursts of 50 messages (ENet unreliable, TCP) drained on the other side, messages/s.
Keyed and plaintext pairs run interleaved (A, B, A, B, ...); min / median over the rounds and
the keyed/plaintext ratio of the medians, in wall time and in this process's CPU time (both
ends run here; CPU time is less disturbed by other jobs on a shared machine). Loopback has no
wire time, so the added latency here is the whole cost of sealing plus the frame's 26 bytes,
an upper bound of its share on a real link.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from pathlib import Path

from halo._core import edge

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


def measure(cases: dict, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    """Runs the cases round-robin after one warm-up round: per case (wall, cpu) seconds."""
    for fn in cases.values():
        fn()
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            out[name][0].append(time.perf_counter() - w0)
            out[name][1].append(time.process_time() - c0)
    return out


def row(protocol: str, what: str, plain: list[float], keyed: list[float], scale: float, rate: bool) -> None:
    def fmt(v: list[float]) -> str:
        lo, med = min(v), statistics.median(v)
        return f"{scale / lo:8.0f}/{scale / med:<8.0f}" if rate else f"{lo * scale:8.1f}/{med * scale:<8.1f}"

    ratio = statistics.median(keyed) / statistics.median(plain)
    print(f"{protocol:5} {what:32} {fmt(plain)} {fmt(keyed)} {1 / ratio if rate else ratio:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    flags = ""
    if Path("/proc/cpuinfo").exists():
        words = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
        flags = " ".join(f for f in ("avx2", "avx512f", "aes", "sha_ni") if f in words)
    print(f"{platform.machine()}, {os.cpu_count()} cpus, flags: {flags}; load {os.getloadavg()[0]:.1f}")
    print(
        f"message {SIZE} bytes; round trip: {ROUND_TRIPS} per sample; one way: {BURSTS} x {BURST} per sample; "
        f"{args.rounds} interleaved rounds"
    )
    key = edge.keygen()
    print(f"{'':5} {'':32} {'plaintext min/med':>17} {'keyed min/med':>17} {'keyed/plain (med)':>8}")
    for protocol, delivery in (("enet", "unreliable"), ("tcp", "control")):
        plain, keyed = pair(protocol, None), pair(protocol, key)
        t = measure(
            {
                "rtt plain": round_trips(*plain, delivery),
                "rtt keyed": round_trips(*keyed, delivery),
                "way plain": one_way(*plain, delivery),
                "way keyed": one_way(*keyed, delivery),
            },
            args.rounds,
        )
        us, n = 1e6 / ROUND_TRIPS, BURSTS * BURST
        for i, kind in ((0, "wall"), (1, "cpu")):
            row(protocol, f"round trip, us/message ({kind})", t["rtt plain"][i], t["rtt keyed"][i], us, False)
            row(protocol, f"one way, messages/s ({kind})", t["way plain"][i], t["way keyed"][i], n, True)
        for i, kind in ((0, "wall"), (1, "cpu")):
            added = (
                (statistics.median(t["rtt keyed"][i]) - statistics.median(t["rtt plain"][i]))
                / ROUND_TRIPS
                / 2
            )
            print(
                f"{protocol:5} added per message, one seal + one open ({kind}, medians): {added * 1e6:.1f} us"
            )
    print(f"load after: {os.getloadavg()[0]:.1f} (a shared machine: other jobs ran meanwhile)")


if __name__ == "__main__":
    main()
