"""Cost of sealing the edge links (issue 22): keyed (libsodium handshake + ChaCha20-Poly1305
frames) against plaintext transports, on loopback, in one thread, with messages the size of
one partial (a group term cut to one ENet datagram).

    python benchmarks/edge/bench_link.py [--rounds 15]

* round trip: a message there and back (two seals, two opens when keyed), per message;
* keyed with each cipher suite the links can agree on: ChaCha20-Poly1305 (``aes=False``) and,
  where the CPU has AES-NI, AES-256-GCM (what two such ends choose);
* one way: bursts of 50 messages (ENet unreliable, TCP) drained on the other side, messages/s.
Plaintext and keyed pairs run interleaved (A, B, C, A, B, C, ...); min / median over the rounds
and the keyed/plaintext ratio of the medians, in wall time and in this process's CPU time (both
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


def pair(
    protocol: str, key: bytes | None, aes: bool = True
) -> tuple[edge.Transport, edge.Transport, int, int]:
    server = edge.Transport(protocol, "127.0.0.1", 0, 2, key=key, aes=aes)
    client = edge.Transport(protocol, "", 0, 2, key=key, aes=aes)
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


def row(protocol: str, what: str, times: dict[str, list[float]], scale: float, rate: bool) -> None:
    def fmt(v: list[float]) -> str:
        lo, med = min(v), statistics.median(v)
        return f"{scale / lo:8.0f}/{scale / med:<8.0f}" if rate else f"{lo * scale:8.1f}/{med * scale:<8.1f}"

    plain = statistics.median(times["plain"])
    cells = []
    for kind in KINDS:
        if kind in times:
            ratio = statistics.median(times[kind]) / plain
            cells.append(f"{fmt(times[kind])} {1 / ratio if rate else ratio:6.3f}")
    print(f"{protocol:5} {what:30} " + "  ".join(cells))


KINDS = ("plain", "chacha", "aes")  # plaintext; sealed with ChaCha20-Poly1305; with AES-256-GCM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    flags = ""
    if Path("/proc/cpuinfo").exists():
        words = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
        flags = " ".join(f for f in ("avx2", "avx512f", "aes", "pclmulqdq", "vaes", "sha_ni") if f in words)
    print(f"{platform.machine()}, {os.cpu_count()} cpus, flags: {flags}; load {os.getloadavg()[0]:.1f}")
    print(
        f"message {SIZE} bytes; round trip: {ROUND_TRIPS} per sample; one way: {BURSTS} x {BURST} per sample; "
        f"{args.rounds} interleaved rounds"
    )
    key = edge.keygen()
    kinds = ("plain", "chacha", "aes") if edge.aes256gcm_available() else ("plain", "chacha")
    print(f"{'':36} " + "  ".join(f"{k + ' min/med':>17} {'/plain':>6}" for k in kinds))
    for protocol, delivery in (("enet", "unreliable"), ("tcp", "control")):
        pairs = {"plain": pair(protocol, None), "chacha": pair(protocol, key, aes=False)}
        if "aes" in kinds:
            pairs["aes"] = pair(protocol, key, aes=True)
        cases = {}
        for kind, p in pairs.items():
            cases[f"rtt {kind}"] = round_trips(*p, delivery)
        for kind, p in pairs.items():
            cases[f"way {kind}"] = one_way(*p, delivery)
        t = measure(cases, args.rounds)
        us, n = 1e6 / ROUND_TRIPS, BURSTS * BURST
        for i, clock in ((0, "wall"), (1, "cpu")):
            rtt = {k: t[f"rtt {k}"][i] for k in pairs}
            way = {k: t[f"way {k}"][i] for k in pairs}
            row(protocol, f"round trip, us/message ({clock})", rtt, us, False)
            row(protocol, f"one way, messages/s ({clock})", way, n, True)
        for i, clock in ((0, "wall"), (1, "cpu")):
            plain = statistics.median(t["rtt plain"][i])
            added = [
                f"{k} {(statistics.median(t[f'rtt {k}'][i]) - plain) / ROUND_TRIPS / 2 * 1e6:.1f} us"
                for k in pairs
                if k != "plain"
            ]
            print(
                f"{protocol:5} added per message, one seal + one open ({clock}, medians): {', '.join(added)}"
            )
    print(f"load after: {os.getloadavg()[0]:.1f} (a shared machine: other jobs ran meanwhile)")


if __name__ == "__main__":
    main()
