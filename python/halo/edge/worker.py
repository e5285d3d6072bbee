"""An edge worker: serves the models it was started with, to one root at a time, over ENet (UDP)
or TCP on the same port.

A root connects (with a key, the transport has authenticated it by then), says hello (wire
version), names one of the worker's models by its fingerprint and the grouping and delivery
it wants (``load``), assigns groups, and then streams layer inputs; the worker answers each
input with its groups' terms: critical groups reliably (with an unreliable copy first under
HALO), the others unreliably.

Everything that arrives is checked against limits derived from the model before it is used;
a message that breaks a rule ends that root's session with a one-line reason, never the
process. No path crosses the wire: models, plans and group stores are the ones named on the
worker's command line. A connection counts as a session, and can take the worker over from
the current root, only once it has said a valid hello.

Long module: a worker session's message handling and the limits that bound every field
of a message from the network belong side by side.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from .._core import edge as _edge
from .compute import WEIGHT_FORMATS, GroupCompute, WeightStore
from .link import (
    Refused,
    check_key,
    frame_limit,
    json_limit,
    make_transport,
    parse_address,
    parse_control,
)
from .model import ATTN, FFN, Checkpoint, EdgeError, Spec, fingerprint, layout, read_spec

REPLAY = 1  # input flag: rebuild key/value caches of the listed groups only
DELIVERIES = ("control", "reliable", "unreliable")
PEERS = 8  # per transport: the session, connections that have not said hello yet, and room
MAX_PENDING = 4  # connections waiting to say hello; the oldest is closed for a newer one
HELLO_SECONDS = 5.0  # a connection that has not said hello by then is closed
DEFERRED_MESSAGES = 256
DEFERRED_BYTES = 32 << 20
LOAD_FIELDS = {"type", "fingerprint", "group_size", "heads_per_group", "threads", "weights", "delivery"}


@dataclass(frozen=True)
class Served:
    """A model this worker serves: where it is (never told to a peer), its shape and fingerprint."""

    path: str
    spec: Spec
    fingerprint: str


def _control(message: dict[str, Any]) -> bytes:
    return _edge.make_control(json.dumps(message).encode())


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(msg: dict[str, Any], key: str, lo: int, hi: int, default: Any = None) -> int:
    value = msg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise Refused(f"'{key}' must be an integer in [{lo}, {hi}], got {_show(value)}")
    return value


def _delivery(value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "critical": "reliable",
        "other": "unreliable",
        "duplicate": False,
        "duplicate_other": False,
    }
    if not isinstance(value, dict) or set(value) - set(out):
        raise Refused(
            f"'delivery' must be an object with critical, other, duplicate, duplicate_other, got {_show(value)}"
        )
    for key in ("critical", "other"):
        mode = value.get(key, out[key])
        if mode not in DELIVERIES:
            raise Refused(f"delivery '{key}' must be one of {', '.join(DELIVERIES)}, got {_show(mode)}")
        out[key] = mode
    for key in ("duplicate", "duplicate_other"):
        flag = value.get(key, False)
        if not isinstance(flag, bool):
            raise Refused(f"delivery '{key}' must be true or false, got {_show(flag)}")
        out[key] = flag
    return out


class _Session:
    """One root's session: its model, groups, key/value caches and pending inputs."""

    def __init__(self, worker: Worker, transport: Any, peer: int) -> None:
        self.worker, self.t, self.peer, self.log = worker, transport, peer, worker.log
        self.served: Served | None = None
        self.store: Any = None
        self.compute: Any = None
        self.groups: list | None = None
        self.held: dict[tuple[int, int], list] = {}
        self.delivery = _delivery({})
        self.done: OrderedDict[int, None] = OrderedDict()
        self.deferred: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.t.send(self.peer, _control(message), "control")
        self.t.flush()

    def close(self) -> None:
        """Frees the session's groups (a group store's loader threads and file too)."""
        store, self.store, self.compute = self.store, None, None
        if store is not None and hasattr(store, "close"):
            store.close()

    def handle(self, data: bytes) -> bool:
        """One message from the root; False when the root said goodbye. Raises Refused."""
        try:
            msg = _edge.decode(data)
        except ValueError as exc:
            raise Refused(f"malformed message ({exc})") from None
        if msg["version"] != _edge.WIRE_VERSION:
            raise Refused(
                f"wire version mismatch: worker speaks {_edge.WIRE_VERSION}, root speaks {msg['version']}"
            )
        if msg["kind"] == "control":
            try:
                body = parse_control(msg["json"], self.worker.json_limit)
            except ValueError as exc:
                raise Refused(str(exc)) from None
            return self.control(body)
        if msg["kind"] == "input":
            self.input(msg)
            return True
        raise Refused(f"unexpected {msg['kind']} message")

    # -- control ---------------------------------------------------------------------------
    def control(self, msg: dict[str, Any]) -> bool:
        kind = msg.get("type")
        if kind == "hello":
            self.send({"type": "hello", "version": _edge.WIRE_VERSION})
        elif kind == "load":
            self.load(msg)
            self.send({"type": "loaded"})
        elif kind == "assign":
            self.assign(msg)
        elif kind == "sync":
            sync = _int(msg, "id", 0, 1 << 53)
            held = self.store.keys() if self.store is not None else []
            self.send({"type": "synced", "id": sync, "held": len(held)})
        elif kind == "bye":
            return False
        else:
            raise Refused(f"unknown control message {_show(kind)}")
        return True

    def load(self, msg: dict[str, Any]) -> None:
        import torch

        unknown = set(msg) - LOAD_FIELDS
        if unknown:
            raise Refused(f"unknown field {_show(sorted(unknown)[0])} in 'load' (no paths cross the wire)")
        served = self.worker.models.get(msg.get("fingerprint"))
        if served is None:
            raise Refused("this worker does not serve a model of that fingerprint")
        spec = served.spec
        group_size = _int(msg, "group_size", 1, spec.inter)
        heads_per_group = _int(msg, "heads_per_group", 1, spec.heads)
        threads = _int(msg, "threads", 1, os.cpu_count() or 1, default=1)
        weights = msg.get("weights", "float32")
        if weights not in WEIGHT_FORMATS:
            raise Refused(f"'weights' must be one of {', '.join(WEIGHT_FORMATS)}, got {_show(weights)}")
        delivery = _delivery(msg.get("delivery", {}))
        groups = layout(spec, group_size, heads_per_group)
        self.close()  # a second load replaces the first: one store per session
        if self.worker.streaming is not None:
            wait_all = delivery["other"] != "unreliable"
            self.store, self.compute = self.worker.streaming.open(
                served.path, spec, groups, served.fingerprint, wait_all
            )
        else:
            self.store = WeightStore(Checkpoint(served.path), spec, weights)
            self.compute = GroupCompute(spec, self.store)
        self.served, self.groups, self.delivery = served, groups, delivery
        self.held, self.done, self.deferred = {}, OrderedDict(), []
        torch.set_num_threads(threads)

    def assign(self, msg: dict[str, Any]) -> None:
        if self.store is None or self.groups is None:
            raise Refused("assign before load")
        wanted = msg.get("groups")
        total = sum(len(part) for layer in self.groups for part in layer)
        if not isinstance(wanted, list) or len(wanted) > total:
            raise Refused(f"'groups' must be a list of at most {total} [layer, part, index]")
        defs = []
        for item in wanted:
            if not (isinstance(item, list) and len(item) == 3):
                raise Refused(f"bad group {_show(item)} (expected [layer, part, index])")
            layer, part, index = item
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in item):
                raise Refused(f"bad group {_show(item)} (expected integers)")
            if not (0 <= layer < len(self.groups) and part in (ATTN, FFN)):
                raise Refused(f"bad group {_show(item)} (no such layer or part)")
            if not 0 <= index < len(self.groups[layer][part]):
                raise Refused(f"bad group {_show(item)} (no such group)")
            defs.append(self.groups[layer][part][index])
        t0 = time.monotonic()
        self.store.hold(defs)
        self.held = {}
        for g in defs:
            self.held.setdefault((g.layer, g.part), []).append(g)
        print(f"halo edge worker: holding {len(defs)} groups ({time.monotonic() - t0:.2f} s)", file=self.log)

    # -- inputs ----------------------------------------------------------------------------
    def input(self, msg: dict[str, Any]) -> None:
        if self.compute is None or self.served is None:
            raise Refused("input before load")
        spec = self.served.spec
        rows = msg["rows"]
        n, width = rows.shape
        if not (0 <= msg["layer"] < spec.layers and msg["part"] in (ATTN, FFN)):
            raise Refused(f"input for layer {msg['layer']} part {msg['part']}: no such layer or part")
        if width != spec.hidden:
            raise Refused(f"input of width {width}, the model's is {spec.hidden}")
        if n < 1 or msg["pos"] + n > spec.max_positions:
            raise Refused(
                f"input of {n} rows at position {msg['pos']}: the model has {spec.max_positions} positions"
            )
        if msg["step"] in self.done:
            return  # the other copy of an input already answered
        if not self._run(msg):
            self._defer(msg)
            return
        # An input that closed a key/value cache gap may let deferred ones run now.
        progress = True
        while progress and self.deferred:
            progress = False
            pending, self.deferred = self.deferred, []
            horizon = msg["step"] - 8 * sum(len(p) for p in self.held.values())
            for m in pending:
                if m["step"] in self.done or m["step"] <= horizon:
                    continue
                if self._run(m):
                    progress = True
                else:
                    self.deferred.append(m)

    def _defer(self, msg: dict[str, Any]) -> None:
        """Keeps an input whose key/value cache gap is still open (an earlier input of the
        layer is being resent), within a bounded count and size."""
        self.deferred.append(msg)
        while len(self.deferred) > DEFERRED_MESSAGES or (
            sum(m["rows"].nbytes for m in self.deferred) > DEFERRED_BYTES and len(self.deferred) > 1
        ):
            self.deferred.pop(0)

    def _run(self, msg: dict[str, Any]) -> bool:
        """Computes and sends one input's terms; False if a key/value cache gap holds it back."""
        import torch

        step, layer, part, pos = msg["step"], msg["layer"], msg["part"], msg["pos"]
        h = torch.from_numpy(msg["rows"])
        try:
            if msg["flags"] & REPLAY:
                wanted = {int(i) for i in msg["critical"]}
                mine = [g for g in self.held.get((layer, ATTN), []) if g.index in wanted]
                with torch.no_grad():
                    self.compute.run(mine, h, pos, replay=True)
            else:
                groups = self.held.get((layer, part), [])
                critical = {int(i) for i in msg["critical"]}
                with torch.no_grad():
                    if self.worker.streaming is not None:  # critical groups are read now if not resident
                        terms = self.compute.run(groups, h, pos, must=critical)
                    else:
                        terms = self.compute.run(groups, h, pos)
                for g, term in zip(groups, terms):
                    if term is None:
                        continue  # not resident at its deadline: the root compensates it, as a lost term
                    crit = g.index in critical
                    if (
                        not crit
                        and self.delivery["duplicate_other"]
                        and self.delivery["other"] == "unreliable"
                    ):
                        # A second, independent chance for a term nobody waits for: lost only
                        # if both copies are (p^2 on independent loss).
                        self.t.send_partial(
                            self.peer, step, pos, layer, part, g.index, term.numpy(), "unreliable", False
                        )
                    self.t.send_partial(
                        self.peer,
                        step,
                        pos,
                        layer,
                        part,
                        g.index,
                        term.numpy(),
                        self.delivery["critical" if crit else "other"],
                        self.delivery["duplicate"] and crit,
                    )
        except EdgeError:
            return False  # a key/value cache gap: an earlier input of this layer is on its way
        self.done[step] = None
        while len(self.done) > 4096:
            self.done.popitem(last=False)
        return True


class Worker:
    """Listens on ADDR:PORT for both protocols and serves ``models`` (folders); ``serve()``
    handles roots one after another. ``key``: the 32-byte pre-shared key (None: plaintext,
    loopback only). ``streaming`` (streaming.WorkerStreaming): keep the
    groups on local disk under a memory budget."""

    def __init__(
        self,
        host: str,
        port: int,
        models: Sequence[str],
        key: bytes | None = None,
        log: TextIO = sys.stderr,
        streaming: Any = None,
    ) -> None:
        self.log = log
        self.streaming = streaming
        self.key = check_key(key, [host])
        if isinstance(models, (str, os.PathLike)):
            models = [models]
        self.models: dict[str, Served] = {}
        for path in models:
            served = Served(str(path), read_spec(path), fingerprint(path))
            self.models.setdefault(served.fingerprint, served)
        if not self.models:
            raise EdgeError("a worker needs at least one model (--model DIR)")
        if streaming is not None:
            streaming.check_plans(self.models)
        specs = [s.spec for s in self.models.values()]
        self.json_limit = max(json_limit(s) for s in specs)
        self.frame = max(frame_limit(s) for s in specs)
        # One port number for both: bind TCP first (port 0 picks a free one), then UDP on it.
        self.tcp = make_transport("tcp", host, port, PEERS, self.key, self.frame)
        self.port = self.tcp.port
        self.enet = make_transport("enet", host, self.port, PEERS, self.key, self.frame)
        self.host = host
        self.session: _Session | None = None
        self.pending: dict[tuple[Any, int], float] = {}  # connections yet to say hello -> deadline
        self.transport_errors = 0

    @property
    def auth_failures(self) -> int:
        """Handshakes that failed on either transport (0 without a key)."""
        return sum(getattr(t, "auth_failures", 0) for t in (self.tcp, self.enet))

    def _say(self, text: str) -> None:
        print(f"halo edge worker: {text}", file=self.log, flush=True)

    def _poll(self, transport: Any, timeout: float) -> Any:
        try:
            return transport.poll(timeout)
        except (RuntimeError, OSError, ValueError) as exc:  # a bad datagram must not end the process
            self.transport_errors += 1
            if self.transport_errors <= 10:
                self._say(f"{transport.protocol} transport error ignored ({' '.join(str(exc).split())})")
            return None

    def _close(self, transport: Any, peer: int, reason: str | None) -> None:
        try:
            if reason is not None:
                transport.send(peer, _control({"type": "error", "message": reason}), "control")
                transport.flush()
            transport.disconnect(peer, reason is None)
        except (RuntimeError, OSError, ValueError):
            pass

    def _end(self, reason: str | None, log: str) -> None:
        """Ends the current session (``reason``: sent to the root as an error first)."""
        session = self.session
        self.session = None
        if session is None:
            return
        self._close(session.t, session.peer, reason)
        session.close()
        self._say(f"session ended ({log})")

    def _event(self, transport: Any, event: Any) -> int:
        """Handles one event; returns the number of sessions it ended."""
        kind, peer, data, _ = event
        key = (transport, peer)
        session = self.session
        current = session is not None and (session.t, session.peer) == key
        if kind == "connect":
            if len(self.pending) >= MAX_PENDING:
                oldest = min(self.pending, key=self.pending.get)
                del self.pending[oldest]
                self._close(*oldest, None)
            self.pending[key] = time.monotonic() + HELLO_SECONDS
            return 0
        if kind == "disconnect":
            self.pending.pop(key, None)
            if current:
                self._end(None, "the root disconnected")
                return 1
            return 0
        if kind != "message":
            return 0
        if current:
            try:
                if session.handle(data):
                    return 0
                self._end(None, "goodbye")
            except Refused as exc:
                self._say(f"refused: {exc}")
                self._end(str(exc), "a message broke the rules")
            except Exception as exc:  # whatever a message causes ends its session only
                self._say(f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
                self._end("internal error (see the worker's log)", "internal error")
            return 1
        if key in self.pending:
            return self._hello(transport, peer, data)
        return 0

    def _hello(self, transport: Any, peer: int, data: bytes) -> int:
        """A pending connection's first message: a valid hello makes it the session (taking
        over from the current root); anything else closes it."""
        del self.pending[(transport, peer)]
        try:
            msg = _edge.decode(data)
            if msg["version"] != _edge.WIRE_VERSION:
                raise Refused(
                    f"wire version mismatch: worker speaks {_edge.WIRE_VERSION}, root speaks {msg['version']}"
                )
            if msg["kind"] != "control" or parse_control(msg["json"], 4096).get("type") != "hello":
                raise Refused("expected hello")
        except (ValueError, Refused) as exc:
            self._close(transport, peer, str(exc) if isinstance(exc, Refused) else "expected hello")
            return 0
        ended = 0
        if self.session is not None:
            self._end(None, "another root took over")
            ended = 1
        self.session = _Session(self, transport, peer)
        self._say(f"root connected over {transport.protocol}")
        try:
            self.session.send({"type": "hello", "version": _edge.WIRE_VERSION})
        except (RuntimeError, OSError, ValueError):
            self._end(None, "the root went away")
            ended += 1
        return ended

    def serve(self, sessions: int | None = None, idle_timeout: float | None = None) -> int:
        """Serves ``sessions`` roots (None: forever); returns after ``idle_timeout`` s without one."""
        served = 0
        idle_since = time.monotonic()
        failures, told = self.auth_failures, time.monotonic()
        while sessions is None or served < sessions:
            session = self.session
            if session is None:
                waits = ((self.enet, 0.02), (self.tcp, 0.02))
            else:
                other = self.tcp if session.t is self.enet else self.enet
                waits = ((other, 0.0), (session.t, 0.05))
            for transport, wait in waits:
                event = self._poll(transport, wait)
                if event is not None:
                    served += self._event(transport, event)
            now = time.monotonic()
            for key in [k for k, deadline in self.pending.items() if deadline < now]:
                del self.pending[key]
                self._close(*key, None)
            if now - told > 10.0 and self.auth_failures != failures:
                self._say(
                    f"{self.auth_failures - failures} failed handshakes or refused frames in {now - told:.0f} s"
                )
                failures, told = self.auth_failures, now
            session = self.session
            if session is not None and not session.t.connected(session.peer):
                self._end(None, "the root is gone")
                served += 1
            if self.session is not None:
                idle_since = now
            if idle_timeout is not None and self.session is None and now - idle_since > idle_timeout:
                break
        if self.session is not None:
            self._end(None, "the worker stops")
        return served


def serve(
    listen: str,
    models: Sequence[str],
    key: bytes | None = None,
    sessions: int | None = None,
    idle_timeout: float | None = None,
    log: TextIO = sys.stderr,
    streaming: Any = None,
) -> int:
    """``halo edge worker --listen ADDR:PORT --model DIR``: prints the bound address, then serves roots."""
    host, port = parse_address(listen, "listen address")
    worker = Worker(host, port, models, key=key, log=log, streaming=streaming)
    print(f"halo edge worker: listening on {host}:{worker.port}", file=log, flush=True)
    return worker.serve(sessions, idle_timeout)
