"""A network test bed on one machine: a root namespace and one namespace per worker.

Each worker's link is a veth pair (root side ``r<i>`` 10.77.<i>.1/24, worker side ``w``
10.77.<i>.2/24) with, per link:

* a rate limit (``tc tbf``) on both ends,
* random loss (nftables ``numgen random`` drops on both ends' ingress: loss p each way),
* optionally delay and Gilbert-Elliott bursts from a userspace relay (tests/net/relay.py) in
  a relay namespace in the middle of the link (this kernel has no netem),
* optionally a tuned TCP minimum RTO on the link's routes (``ip route ... rto_min``).

Neighbour entries are static, so ARP never adds delays. ``Testbed`` is a context manager and
tears everything down on exit, on failure, at interpreter exit and on SIGTERM; leftovers of
dead test beds (their pid in the name) are removed when a new one starts. ``available()``
says why namespaces cannot be used here (tests skip with that reason).

    with Testbed([Link(rate_mbit=100, plr=0.05)] * 4) as bed:
        bed.popen(bed.worker(0), ["python", "-m", "halo.cli", "edge", "worker", "--listen", bed.worker_address(0, 7000)])
        with bed.inside(bed.root):
            ...  # sockets opened here live in the root namespace
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

RELAY = Path(__file__).with_name("relay.py")
PREFIX = "htb"
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Link:
    rate_mbit: float | None = 100.0  # None: no rate limit
    plr: float = 0.0  # loss each way
    burst: float = 1.0  # mean loss-burst length; > 1 uses the relay (Gilbert-Elliott)
    delay_ms: float = 0.0  # one-way; > 0 uses the relay
    rto_min_ms: float | None = None  # tuned TCP minimum RTO on this link's routes

    @property
    def relayed(self) -> bool:
        return self.delay_ms > 0 or self.burst > 1.0


def _run(argv: Sequence[str], check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def available() -> str | None:
    """None when namespaces, veth, tbf and nftables work here; otherwise why not."""
    for tool in ("ip", "tc", "nft", "ethtool"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (apt-get install iproute2 nftables ethtool)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"{PREFIX}{os.getpid()}probe"
    try:
        _run(["ip", "netns", "add", name], timeout=10)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace ({exc})"
    try:
        _run(["ip", "netns", "exec", name, "nft", "add", "table", "netdev", "probe"], timeout=10)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"nftables does not work in a namespace ({exc})"
    finally:
        _run(["ip", "netns", "del", name], check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Deletes namespaces of test beds whose process is gone."""
    listing = _run(["ip", "netns", "list"], check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)[a-z]\w*", name)
        if m and not _alive(int(m.group(1))):
            _run(["ip", "netns", "del", name], check=False)


_libc = ctypes.CDLL(None, use_errno=True)


class Testbed:
    def __init__(self, links: Sequence[Link], seed: int = 0, relay_seconds: float = 3600.0) -> None:
        if not 1 <= len(links) <= 64:
            raise ValueError(f"[Testbed] need 1..64 links, got {len(links)}")
        self.links = list(links)
        self.seed = seed
        self.relay_seconds = relay_seconds
        self.tag = f"{PREFIX}{os.getpid()}"
        self.root = f"{self.tag}r"
        self.relay_ns = f"{self.tag}x"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []
        self.relay: subprocess.Popen | None = None
        self._tmp = tempfile.mkdtemp(prefix="halo-testbed-")
        self._up = False

    # -- names and addresses ---------------------------------------------------------------
    def worker(self, i: int) -> str:
        return f"{self.tag}w{i}"

    @staticmethod
    def worker_ip(i: int) -> str:
        return f"10.77.{i}.2"

    @staticmethod
    def root_ip(i: int) -> str:
        return f"10.77.{i}.1"

    def worker_address(self, i: int, port: int) -> str:
        return f"{self.worker_ip(i)}:{port}"

    # -- building ---------------------------------------------------------------------------
    def _ns(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", ns, *argv], check=check)

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self._ns(name, "ip", "link", "set", "lo", "up")

    def _mac(self, ns: str, dev: str) -> str:
        out = self._ns(ns, "cat", f"/sys/class/net/{dev}/address").stdout.strip()
        return out

    def _veth(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
        _run(f"ip link add {dev_a} netns {ns_a} type veth peer name {dev_b} netns {ns_b}".split())
        self._ns(ns_a, "ip", "link", "set", dev_a, "up")
        self._ns(ns_b, "ip", "link", "set", dev_b, "up")

    def _rate(self, ns: str, dev: str, mbit: float | None) -> None:
        if mbit is None:
            return
        # Burst: at least one timer tick of traffic (rate / HZ) and a few full frames.
        burst = max(int(mbit * 1e6 / 8 / 250), 16 * 1514)
        self._ns(
            ns, *f"tc qdisc replace dev {dev} root tbf rate {mbit}mbit burst {burst} latency 100ms".split()
        )

    def _loss_rules(self, ns: str, dev: str, plr: float) -> None:
        table = f"loss_{dev}"
        self._ns(ns, "nft", "delete", "table", "netdev", table, check=False)
        if plr <= 0:
            return
        ppm = round(plr * 1_000_000)
        script = (
            f"table netdev {table} {{\n"
            f"  chain ingress {{ type filter hook ingress device {dev} priority 0; policy accept;\n"
            f"    meta protocol ip numgen random mod 1000000 < {ppm} drop\n"
            f"  }}\n}}\n"
        )
        path = Path(self._tmp) / f"{ns}-{dev}.nft"
        path.write_text(script)
        self._ns(ns, "nft", "-f", str(path))

    def set_loss(self, i: int, plr: float, burst: float | None = None) -> None:
        """Changes link i's loss (each way) while the bed is up: nftables for a plain link,
        the relay (which also takes a new mean burst length) for a relayed one."""
        link = self.links[i]
        if not link.relayed:
            if burst not in (None, 1.0):
                raise ValueError(f"[Testbed.set_loss] link {i} is not relayed: it cannot make bursts")
            self._loss_rules(self.root, f"r{i}", plr)
            self._loss_rules(self.worker(i), "w", plr)
            self.links[i] = replace(link, plr=plr)
            return
        self.links[i] = replace(link, plr=plr, burst=link.burst if burst is None else max(burst, 1.0 + 1e-9))
        self._relay_config[self._relay_index[i]].update(plr=plr, burst=self.links[i].burst)
        self._relay_path.write_text(json.dumps(self._relay_config))
        self.relay.send_signal(signal.SIGHUP)
        line = self.relay.stdout.readline()
        if "relay reloaded" not in line:
            raise RuntimeError(f"[Testbed.set_loss] the relay did not take the new loss: {line.strip()}")

    def set_rto_min(self, i: int, ms: float | None) -> None:
        """Link i's TCP minimum RTO (both ends' routes); None: the kernel default (200 ms).
        Connections opened afterwards use it."""
        net = f"10.77.{i}.0/24"
        extra = [] if ms is None else ["rto_min", f"{ms:g}ms"]
        self._ns(
            self.root, *f"ip route replace {net} dev r{i} scope link src {self.root_ip(i)}".split(), *extra
        )
        self._ns(
            self.worker(i),
            *f"ip route replace {net} dev w scope link src {self.worker_ip(i)}".split(),
            *extra,
        )
        self.links[i] = replace(self.links[i], rto_min_ms=ms)

    def up(self) -> Testbed:
        remove_stale()
        atexit.register(self.down)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

            def on_term(signum, frame):
                self.down()
                sys.exit(128 + signum)

            with contextlib.suppress(ValueError):  # only the main thread may set handlers
                signal.signal(signal.SIGTERM, on_term)
        self._up = True
        try:
            self._add_ns(self.root)
            relay_config = []
            if any(link.relayed for link in self.links):
                self._add_ns(self.relay_ns)
            for i, link in enumerate(self.links):
                w = self.worker(i)
                self._add_ns(w)
                if link.relayed:
                    self._veth(self.root, f"r{i}", self.relay_ns, f"a{i}")
                    self._veth(self.relay_ns, f"b{i}", w, "w")
                    # The relay forwards frames as captured: the senders must fill in checksums
                    # and cut segments themselves (no offload), nothing may be merged on the way.
                    ends = (
                        (self.root, f"r{i}"),
                        (w, "w"),
                        (self.relay_ns, f"a{i}"),
                        (self.relay_ns, f"b{i}"),
                    )
                    for ns, dev in ends:
                        self._ns(
                            ns,
                            *f"ethtool -K {dev} tx off sg off tso off gso off gro off".split(),
                            check=False,
                        )
                    relay_config.append(
                        {
                            "a": f"a{i}",
                            "b": f"b{i}",
                            "delay_ms": link.delay_ms,
                            "plr": link.plr,
                            "burst": link.burst,
                            "seed": self.seed * 1000 + i,
                            "max_seconds": self.relay_seconds,
                        }
                    )
                else:
                    self._veth(self.root, f"r{i}", w, "w")
                self._ns(self.root, "ip", "addr", "add", f"{self.root_ip(i)}/24", "dev", f"r{i}")
                self._ns(w, "ip", "addr", "add", f"{self.worker_ip(i)}/24", "dev", "w")
                mac_w, mac_r = self._mac(w, "w"), self._mac(self.root, f"r{i}")
                self._ns(
                    self.root,
                    *f"ip neigh replace {self.worker_ip(i)} lladdr {mac_w} dev r{i} nud permanent".split(),
                )
                self._ns(w, *f"ip neigh replace {self.root_ip(i)} lladdr {mac_r} dev w nud permanent".split())
                self._rate(self.root, f"r{i}", link.rate_mbit)
                self._rate(w, "w", link.rate_mbit)
                if not link.relayed:
                    self._loss_rules(self.root, f"r{i}", link.plr)
                    self._loss_rules(w, "w", link.plr)
                if link.rto_min_ms is not None:
                    self.set_rto_min(i, link.rto_min_ms)
            if relay_config:
                path = Path(self._tmp) / "relay.json"
                path.write_text(json.dumps(relay_config))
                self._relay_path = path
                self._relay_config = relay_config
                self._relay_index = {int(c["a"][1:]): k for k, c in enumerate(relay_config)}
                self.relay = subprocess.Popen(
                    ["ip", "netns", "exec", self.relay_ns, sys.executable, str(RELAY), str(path)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                line = self.relay.stdout.readline() if self.relay.stdout else ""
                if "relay ready" not in line:
                    raise RuntimeError(f"[Testbed] the relay did not start: {line.strip()}")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        if not self._up:
            return
        self._up = False
        for p in [*self.processes, *([self.relay] if self.relay else [])]:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5
        for p in [*self.processes, *([self.relay] if self.relay else [])]:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for ns in reversed(self.namespaces):
            _run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.down)

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- running things in it ---------------------------------------------------------------
    def popen(self, ns: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Starts a process inside namespace ``ns``; it is stopped when the bed goes down."""
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)
        self.processes.append(p)
        return p

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """Runs the block with this thread in namespace ``ns`` (sockets opened there stay there)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
            try:
                yield
            finally:
                if _libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the original namespace failed")
        finally:
            os.close(target)
            os.close(home)
