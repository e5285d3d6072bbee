"""An edge worker: serves one root at a time over ENet (UDP) or TCP on the same port.

The root connects, says hello (wire version), tells the worker which model folder to read
(checked by fingerprint) and how to send (policy), assigns groups, and then streams layer
inputs; the worker answers each input with its groups' terms: critical groups reliably (with
an unreliable copy first under HALO), the others unreliably. Every wait has a deadline: an
idle session ends when the root disconnects or ENet gives up on it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import OrderedDict
from typing import Any, TextIO

from ._core import edge as _edge
from .edge_model import ATTN, Checkpoint, EdgeError, GroupCompute, WeightStore, fingerprint, layout, read_spec

REPLAY = 1  # input flag: rebuild key/value caches of the listed groups only


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise EdgeError(f"bad {what} {text!r} (expected HOST:PORT)")
    return host, int(port)


def _control(message: dict[str, Any]) -> bytes:
    return _edge.make_control(json.dumps(message).encode())


class _Session:
    def __init__(self, transport: Any, peer: int, log: TextIO, streaming: Any = None) -> None:
        self.t, self.peer, self.log = transport, peer, log
        self.streaming = streaming  # edge_store.WorkerStreaming: groups from disk under a memory budget
        self.spec = None
        self.store: WeightStore | None = None
        self.compute: GroupCompute | None = None
        self.groups = None
        self.held: dict[tuple[int, int], list] = {}
        self.delivery = {"critical": "reliable", "other": "unreliable", "duplicate": False}
        self.done: OrderedDict[int, None] = OrderedDict()
        self.deferred: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.t.send(self.peer, _control(message), "control")
        self.t.flush()

    def error(self, text: str) -> None:
        self.send({"type": "error", "message": text})

    # -- control ---------------------------------------------------------------------------
    def control(self, msg: dict[str, Any]) -> bool:
        kind = msg.get("type")
        if kind == "hello":
            self.send({"type": "hello", "version": _edge.WIRE_VERSION, "pid": os.getpid()})
        elif kind == "load":
            self.load(msg)
        elif kind == "assign":
            self.assign(msg)
        elif kind == "sync":
            held = self.store.keys() if self.store is not None else []
            self.send({"type": "synced", "id": msg.get("id"), "held": len(held)})
        elif kind == "bye":
            return False
        else:
            self.error(f"unknown control message {kind!r}")
        return True

    def load(self, msg: dict[str, Any]) -> None:
        import torch

        try:
            model = str(msg["model"])
            spec = read_spec(model)
            if fingerprint(model) != msg.get("fingerprint"):
                raise EdgeError(f"the model at {model} differs from the root's (fingerprint mismatch)")
            self.spec = spec
            self.groups = layout(spec, int(msg["group_size"]), int(msg["heads_per_group"]))
            self.delivery.update(msg.get("delivery", {}))
            if self.streaming is not None:
                self.store, self.compute = self.streaming.open(model, spec, self.groups, msg)
            else:
                self.store = WeightStore(Checkpoint(model), spec, str(msg.get("weights", "float32")))
                self.compute = GroupCompute(spec, self.store)
            torch.set_num_threads(int(msg.get("threads", 1)))
        except (EdgeError, KeyError, TypeError, ValueError) as exc:
            self.error(f"cannot load the model: {exc}")
            return
        self.send({"type": "loaded"})

    def assign(self, msg: dict[str, Any]) -> None:
        if self.store is None:
            self.error("assign before load")
            return
        try:
            defs = [self.groups[int(layer)][int(part)][int(index)] for layer, part, index in msg["groups"]]
        except (IndexError, KeyError, TypeError, ValueError) as exc:
            self.error(f"bad group assignment ({exc})")
            return
        t0 = time.monotonic()
        try:
            self.store.hold(defs)
        except EdgeError as exc:
            self.error(f"cannot hold the assigned groups: {exc}")
            return
        self.held = {}
        for g in defs:
            self.held.setdefault((g.layer, g.part), []).append(g)
        print(f"halo edge worker: holding {len(defs)} groups ({time.monotonic() - t0:.2f} s)", file=self.log)

    # -- inputs ----------------------------------------------------------------------------
    def input(self, msg: dict[str, Any]) -> None:
        import torch

        step = msg["step"]
        if step in self.done:
            return  # the other copy of an input already answered
        if self.compute is None:
            self.error("input before load")
            return
        layer, part, pos = msg["layer"], msg["part"], msg["pos"]
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
                    if self.streaming is not None:  # critical groups are read now if not resident
                        terms = self.compute.run(groups, h, pos, must=critical)
                    else:
                        terms = self.compute.run(groups, h, pos)
                for g, term in zip(groups, terms):
                    if term is None:
                        continue  # not resident at its deadline: the root compensates it, as a lost term
                    crit = g.index in critical
                    self.t.send_partial(
                        self.peer,
                        step,
                        pos,
                        layer,
                        part,
                        g.index,
                        term.numpy(),
                        self.delivery["critical" if crit else "other"],
                        bool(self.delivery.get("duplicate")) and crit,
                    )
        except EdgeError:
            # A key/value cache gap: an earlier input of this layer is still on its way
            # (its reliable copy is being resent). Keep this one until the gap closes.
            self.deferred = [*self.deferred[-255:], msg]
            return
        self.done[step] = None
        while len(self.done) > 4096:
            self.done.popitem(last=False)
        if self.deferred:
            pending, self.deferred = self.deferred, []
            for m in pending:
                if m["step"] > step - 8 * len(self.groups or [1]):
                    self.input(m)


def _serve_session(
    transport: Any, peer: int, log: TextIO, streaming: Any = None, other: Any = None
) -> tuple[Any, int] | None:
    """Serves one root until it leaves; returns (transport, peer) of a newer root that connected
    meanwhile, over either protocol (it takes over: a root that vanished, or whose goodbye was
    lost on a lossy link, must not block the worker until its transport times it out), else None."""
    session = _Session(transport, peer, log, streaming)
    while True:
        if other is not None:
            knock = other.poll(0)
            if knock is not None and knock[0] == "connect":
                transport.disconnect(peer, True)
                return other, knock[1]
        event = transport.poll(0.5 if other is None else 0.05)
        if event is None:
            if not transport.connected(peer):
                return None
            continue
        kind, who, data, _ = event
        if kind == "connect" and who != peer:
            transport.disconnect(peer, True)
            return transport, who
        if kind == "disconnect":
            if who == peer:
                return None
            continue
        if who != peer or kind != "message":
            continue
        try:
            msg = _edge.decode(data)
        except ValueError as exc:
            session.error(f"malformed message ({exc})")
            continue
        if msg["version"] != _edge.WIRE_VERSION:
            transport.send(
                peer,
                _control(
                    {
                        "type": "error",
                        "message": f"wire version mismatch: worker speaks {_edge.WIRE_VERSION}, "
                        f"root speaks {msg['version']}",
                    }
                ),
                "control",
            )
            transport.flush()
            transport.disconnect(peer, False)
            return None
        if msg["kind"] == "control":
            try:
                body = json.loads(msg["json"])
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                session.error(f"control message is not a JSON object ({exc})")
                continue
            if not session.control(body):
                transport.disconnect(peer, False)
                return None
        elif msg["kind"] == "input":
            session.input(msg)


class Worker:
    """Listens on ADDR:PORT for both protocols; ``serve()`` handles roots one after another."""

    def __init__(self, host: str, port: int, log: TextIO = sys.stderr, streaming: Any = None) -> None:
        self.log = log
        self.streaming = streaming
        # One port number for both: bind TCP first (port 0 picks a free one), then UDP on it.
        self.tcp = _edge.Transport("tcp", host, port, 4)
        self.port = self.tcp.port
        try:
            self.enet = _edge.Transport("enet", host, self.port, 4)
        except RuntimeError as exc:
            raise EdgeError(str(exc)) from None
        self.host = host

    def serve(self, sessions: int | None = None, idle_timeout: float | None = None) -> int:
        """Serves ``sessions`` roots (None: forever); returns after ``idle_timeout`` s without one."""
        served = 0
        idle_since = time.monotonic()
        while sessions is None or served < sessions:
            for transport in (self.enet, self.tcp):
                event = transport.poll(0.02)
                current = (transport, event[1]) if event is not None and event[0] == "connect" else None
                while current is not None:
                    on, peer = current
                    other = self.tcp if on is self.enet else self.enet
                    print(f"halo edge worker: root connected over {on.protocol}", file=self.log)
                    current = _serve_session(on, peer, self.log, self.streaming, other)
                    print("halo edge worker: session ended", file=self.log)
                    served += 1
                    idle_since = time.monotonic()
            if idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                break
        return served


def serve(
    listen: str,
    sessions: int | None = None,
    idle_timeout: float | None = None,
    log: TextIO = sys.stderr,
    streaming: Any = None,
) -> int:
    """``halo edge worker --listen ADDR:PORT``: prints the bound address, then serves roots.
    ``streaming`` (edge_store.WorkerStreaming): keep groups on disk under a memory budget."""
    host, port = parse_address(listen, "listen address")
    worker = Worker(host, port, log, streaming)
    print(f"halo edge worker: listening on {host}:{worker.port}", file=log, flush=True)
    return worker.serve(sessions, idle_timeout)
