"""Userspace link relay for the test bed: delay and Gilbert-Elliott burst loss.

This machine kind's kernel has no netem, so a relay namespace sits in the middle of a link:
two veth ends per link (``a`` towards the root, ``b`` towards the worker) and this process
moving Ethernet frames between them through raw packet sockets, each direction with its own
one-way delay and Gilbert-Elliott loss state (bad state loses every frame, mean burst length
``burst``, long-run loss ``plr``; burst 1 is Bernoulli). Only IPv4 frames are subject to loss
(ARP always passes). Frames keep their order per direction.

    python relay.py CONFIG.json      # [{"a": "a0", "b": "b0", "delay_ms": 1, "plr": 0.05, "burst": 3, "seed": 1}, ...]

SIGHUP re-reads CONFIG.json (same links, new delay/loss). Stops on SIGTERM/SIGINT or after
``max_seconds`` (default 3600): every loop is bounded in time.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import random
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800


class Direction:
    def __init__(self, out: socket.socket, delay: float, plr: float, burst: float, seed: int) -> None:
        self.out = out
        self.configure(delay, plr, burst)
        self.rng = random.Random(seed)
        self.bad = False
        self.last_due = 0.0
        self.passed = self.dropped = 0

    def configure(self, delay: float, plr: float, burst: float) -> None:
        self.delay, self.plr, self.burst = delay, plr, max(burst, 1.0)

    def lost(self) -> bool:
        if self.plr <= 0:
            return False
        u = self.rng.random()
        if self.burst <= 1.0:
            return u < self.plr
        # Leave the bad state with probability 1/burst (mean run = burst frames); enter it so
        # that the stationary loss rate is plr.
        if self.bad:
            self.bad = u >= 1.0 / self.burst
        else:
            self.bad = u < self.plr / (self.burst * (1.0 - self.plr))
        return self.bad


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        config = json.load(f)
    max_seconds = float(config[0].get("max_seconds", 3600)) if config else 3600.0
    sockets: dict[int, tuple[socket.socket, Direction]] = {}
    for i, link in enumerate(config):
        a = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        b = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        a.bind((link["a"], 0))
        b.bind((link["b"], 0))
        for s in (a, b):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        delay = float(link.get("delay_ms", 0.0)) / 1e3
        plr, burst, seed = (
            float(link.get("plr", 0.0)),
            float(link.get("burst", 1.0)),
            int(link.get("seed", i)),
        )
        sockets[a.fileno()] = (a, Direction(b, delay, plr, burst, 2 * seed + 1))  # root -> worker
        sockets[b.fileno()] = (b, Direction(a, delay, plr, burst, 2 * seed + 2))  # worker -> root
    stop: list[int] = []
    reload: list[int] = []
    signal.signal(signal.SIGHUP, lambda *_: reload.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    queue: list[tuple[float, int, bytes, Direction]] = []
    order = 0
    end = time.monotonic() + max_seconds
    print("relay ready", flush=True)
    directions = [d for _, d in sockets.values()]
    while not stop and time.monotonic() < end:
        if reload:
            reload.clear()
            with open(argv[1]) as f:
                for i, link in enumerate(json.load(f)):
                    for d in directions[2 * i : 2 * i + 2]:
                        d.configure(
                            float(link.get("delay_ms", 0.0)) / 1e3, float(link["plr"]), float(link["burst"])
                        )
            print("relay reloaded", flush=True)
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, frame, direction = heapq.heappop(queue)
            with contextlib.suppress(OSError):
                direction.out.send(frame)
        timeout = 0.2 if not queue else max(0.0, queue[0][0] - time.monotonic())
        ready, _, _ = select.select(list(sockets), [], [], timeout)
        for fd in ready:
            sock, direction = sockets[fd]
            for _ in range(256):  # bounded batch per socket
                try:
                    frame, address = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                if address[2] == socket.PACKET_OUTGOING:
                    continue  # our own send on this interface
                is_ip = len(frame) >= 14 and int.from_bytes(frame[12:14], "big") == ETH_P_IP
                if is_ip and direction.lost():
                    direction.dropped += 1
                    continue
                direction.passed += 1
                due = max(time.monotonic() + direction.delay, direction.last_due)
                direction.last_due = due
                order += 1
                heapq.heappush(queue, (due, order, frame, direction))
    stats = {str(fd): [d.passed, d.dropped] for fd, (_, d) in sockets.items()}
    print(json.dumps({"relay_stats": stats}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
