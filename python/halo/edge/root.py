"""The root of halo's edge runtime: drives workers layer by layer over lossy links.

Per exchange (one layer's attention or FFN) the root sends the layer input to the workers
that hold groups of it, marks the critical groups (``policy.TermPolicy``: attention and
prefill terms, and the FFN groups the predictor scores highest) and gathers the terms: under
the ``halo`` policy critical terms come reliably and the rest are used if they arrive before
a deadline derived from the monitor's latency estimate, the missing ones compensated
(``policy.compensate``); the ``tcp`` and ``reliable-udp`` baselines wait for every term.
A worker that disconnects or stays silent past the hard deadline is dropped and its groups
re-placed through the balancer (as are groups of links whose loss estimate drifts); every wait
has a deadline.

Long module: ``Root`` is one state machine (send, gather under deadlines, drop and re-place
workers, replan on drift) whose parts share its per-run state; cutting it would spread that
state over modules.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TextIO

import numpy as np

from .. import sched
from .._core import edge as _edge
from .compute import RootModel
from .link import check_key, frame_limit, json_limit, make_transport, parse_address, parse_control
from .model import ATTN, FFN, Checkpoint, EdgeError, fingerprint, layout, read_spec
from .plan import Plan, assign_groups, check_plan_shape, load_plan
from .policy import COMPENSATIONS, TermPolicy, compensate
from .predictor import PartPredictor, load_predictors
from .runner import POLICIES, Exchange, Local, Runner, RunOptions, Stats
from .worker import REPLAY

__all__ = ["COMPENSATIONS", "POLICIES", "Local", "Root", "RunOptions", "Stats", "compensate", "run"]
BAD_TERM_EXCHANGES = 3  # a worker whose terms are non-finite in this many exchanges is dropped


class Root(Runner):
    """The root process's side of a run (use as a context manager, or call close())."""

    def __init__(
        self,
        model_dir: str,
        workers: Sequence[str],
        plan: Plan | str,
        options: RunOptions | None = None,
        log: TextIO | None = None,
        key: bytes | None = None,
        **overrides: Any,
    ) -> None:
        self.options = replace(options or RunOptions(), **overrides).check()
        self.log = log
        self.model_dir = str(model_dir)
        self.spec = read_spec(model_dir)
        self.addresses = [parse_address(w, "worker address") for w in workers]
        if not self.addresses:
            raise EdgeError("no workers given")
        if len(set(self.addresses)) != len(self.addresses):
            raise EdgeError("a worker address is listed twice")
        self._key = check_key(key, [host for host, _ in self.addresses])
        self.fingerprint = fingerprint(model_dir)
        self.plan = load_plan(plan, self.spec, self.fingerprint) if not isinstance(plan, Plan) else plan
        check_plan_shape(self.plan, self.spec)
        if self.plan.fingerprint != self.fingerprint:
            raise EdgeError("the plan was made for another model (fingerprint mismatch)")
        if self.plan.workers != len(self.addresses):
            raise EdgeError(
                f"the plan places groups on {self.plan.workers} workers, {len(self.addresses)} given"
            )
        self.groups = layout(self.spec, self.plan.group_size, self.plan.heads_per_group)
        self.predictors: dict[tuple[int, int], PartPredictor] = {}
        path = self.plan.predictor_path()
        if path is not None:
            self.predictors = load_predictors(path, self.spec, self.groups)
        if self.options.compensation is None:
            self.options.compensation = "predictor" if self.predictors else "zero"
        if self.options.compensation == "predictor" and not self.predictors:
            raise EdgeError("compensation 'predictor' needs a plan with predictors (calibration_tokens > 0)")
        self.model = RootModel(Checkpoint(model_dir), self.spec)
        self.assignment = [[list(p) for p in layer] for layer in self.plan.assignment]
        self.devices = list(self.plan.devices)
        W = len(self.addresses)
        self.alive = [True] * W
        self.peer = [-1] * W
        self.monitor = sched.Monitor(W, alpha=self.options.monitor_alpha)
        self.latency: dict[tuple[int, int], sched.Monitor] = {}
        self.latency_count: dict[tuple[int, int, int], int] = {}
        self.stats = Stats()
        self.history: list[list[np.ndarray]] = [[] for _ in range(self.spec.layers)]
        self.transport: Any = None
        self._step = 0
        self._sync = 0
        self._observed = [0] * W
        self._unheard = [0.0] * W  # seconds of exchanges since each worker was last heard from
        self._missed: dict[tuple[int, int], tuple[int, tuple[float, tuple[int, int]]]] = {}
        self._bad_terms = [0] * W  # exchanges in which each worker sent non-finite terms
        self._json_limit = json_limit(self.spec)
        policy = self.options.policy
        self.wait_all = policy != "halo"
        self.hard_timeout = self.options.hard_timeout or (0.5 if policy == "halo" else 10.0)
        self.silent_timeout = self.options.silent_timeout or max(2.0, self.hard_timeout)
        self.critical_fraction = (
            self.plan.critical_fraction
            if self.options.critical_fraction is None
            else self.options.critical_fraction
        )
        # Reliable attention and prefill terms protect the key/value caches a causal model keeps
        # (a lost term there stays in every later token); an encoder keeps none: unchanged.
        halo = policy == "halo" and self.spec.family == "llama"
        self.policy = TermPolicy(
            self.groups,
            self.plan.importance,
            self.predictors,
            self.critical_fraction,
            self.options.compensation,
            coverage=self.options.coverage,
            reliable_attention=halo and self.options.reliable_attention,
            reliable_prefill=halo and self.options.reliable_prefill,
            wait_all=self.wait_all,
        )

    # -- connection ------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.log is not None:
            print(f"halo edge: {text}", file=self.log, flush=True)

    def _name(self, w: int) -> str:
        host, port = self.addresses[w]
        return f"{host}:{port}"

    def _send(self, w: int, message: dict[str, Any]) -> None:
        self.transport.send(self.peer[w], _edge.make_control(json.dumps(message).encode()), "control")

    def _await(self, kind: str, workers: Sequence[int], timeout: float, fatal: bool) -> dict[int, dict]:
        """Waits for a control answer ``kind`` from each worker; errors are one-line EdgeErrors
        (``fatal``) or drop the worker."""
        deadline = time.monotonic() + timeout
        waiting = set(workers)
        answers: dict[int, dict] = {}
        by_peer = {self.peer[w]: w for w in workers}

        def failed(w: int, why: str) -> None:
            if fatal:
                raise EdgeError(f"worker {self._name(w)} {why}")
            self._drop(w, why)
            waiting.discard(w)

        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                for w in sorted(waiting):
                    failed(w, f"did not answer '{kind}' within {timeout:g} s")
                break
            event = self.transport.poll(min(left, 0.5))
            if event is None:
                continue
            what, peer, data, _ = event
            w = by_peer.get(peer)
            if w is None or w not in waiting:
                continue
            if what == "disconnect":
                failed(w, f"closed the connection (waiting for '{kind}')")
                continue
            if what != "message":
                continue
            try:
                msg = _edge.decode(data)
            except ValueError:
                failed(w, "sent a malformed message")
                continue
            if msg["version"] != _edge.WIRE_VERSION:
                failed(w, f"speaks wire version {msg['version']}, this root speaks {_edge.WIRE_VERSION}")
                continue
            if msg["kind"] != "control":
                continue  # a late term of an earlier exchange
            try:
                body = parse_control(msg["json"], self._json_limit)
            except ValueError as exc:
                failed(w, f"sent a malformed control message ({exc})")
                continue
            if body.get("type") == "error":
                failed(w, f"failed: {body.get('message')}")
                continue
            if body.get("type") == kind and (kind != "synced" or body.get("id") == self._sync):
                answers[w] = body
                waiting.discard(w)
        return answers

    def connect(self) -> Root:
        try:
            return self._connect()
        except BaseException:
            # Free the workers that did answer: they serve one root at a time.
            if self.transport is not None:
                for peer in self.peer:
                    if peer >= 0:
                        self.transport.disconnect(peer, True)
                self.transport = None
            raise

    def _connect(self) -> Root:
        o = self.options
        self.transport = make_transport(
            "tcp" if o.policy == "tcp" else "enet",
            "",
            0,
            len(self.addresses) + 1,
            self._key,
            frame_limit(self.spec),
        )
        for w, (host, port) in enumerate(self.addresses):
            try:
                self.peer[w] = self.transport.connect(host, port, o.connect_timeout)
            except ConnectionError as exc:
                reason = str(exc).split("] ", 1)[-1]
                raise EdgeError(f"worker {host}:{port} unreachable ({reason})") from None
        everyone = range(len(self.addresses))
        for w in everyone:
            self._send(w, {"type": "hello", "version": _edge.WIRE_VERSION, "policy": o.policy})
        self._await("hello", everyone, o.connect_timeout, fatal=True)
        delivery = {
            "halo": {
                "critical": "reliable",
                "other": "unreliable",
                "duplicate": o.duplicate_critical,
                "duplicate_other": o.duplicate_other,
            },
            "reliable-udp": {"critical": "reliable", "other": "reliable", "duplicate": False},
            "tcp": {"critical": "reliable", "other": "reliable", "duplicate": False},
        }[o.policy]
        load = {  # the model by its fingerprint: workers serve the models they were started with
            "type": "load",
            "fingerprint": self.fingerprint,
            "group_size": self.plan.group_size,
            "heads_per_group": self.plan.heads_per_group,
            "delivery": delivery,
            "threads": o.threads,
            "weights": o.weights,
        }
        for w in everyone:
            self._send(w, load)
        self._await("loaded", everyone, o.load_timeout, fatal=True)
        self._distribute(self.assignment, fatal=True, replay=False)
        self._say(f"{len(self.addresses)} workers ready ({o.policy}, {self.transport.protocol})")
        return self

    def _distribute(self, assignment, fatal: bool, replay: bool, before=None) -> None:
        """Sends each live worker its groups (and, after a re-plan, the inputs that rebuild the
        key/value caches of attention groups new to it), then waits until all have them."""
        live = [w for w in range(len(self.addresses)) if self.alive[w]]
        for w in live:
            mine = [
                [layer, part, i]
                for layer in range(self.spec.layers)
                for part in (ATTN, FFN)
                for i, owner in enumerate(assignment[layer][part])
                if owner == w
            ]
            self._send(w, {"type": "assign", "groups": mine})
            if replay and before is not None:
                self._replay(w, assignment, before)
        self._sync += 1
        for w in live:
            self._send(w, {"type": "sync", "id": self._sync})
        self.transport.flush()
        self._await("synced", live, self.options.load_timeout, fatal=fatal)

    def _replay(self, w: int, assignment, before) -> None:
        if self.spec.family != "llama":
            return  # BERT keeps no cache between forwards
        for layer in range(self.spec.layers):
            new = [
                i
                for i, owner in enumerate(assignment[layer][ATTN])
                if owner == w and before[layer][ATTN][i] != w
            ]
            if not new or not self.history[layer]:
                continue
            rows = np.concatenate(self.history[layer])
            for start in range(0, rows.shape[0], 256):
                self.transport.send_input(
                    self.peer[w],
                    self._next_step(),
                    start,
                    layer,
                    ATTN,
                    new,
                    rows[start : start + 256],
                    "control",
                    REPLAY,
                )

    def close(self) -> None:
        if self.transport is None:
            return
        for w in range(len(self.addresses)):
            if self.alive[w] and self.peer[w] >= 0:
                with contextlib.suppress(RuntimeError):
                    self._send(w, {"type": "bye"})
        self.transport.flush()
        end = time.monotonic() + 0.2
        while time.monotonic() < end and self.transport.poll(0.02) is not None:
            pass
        for w in range(len(self.addresses)):
            if self.peer[w] >= 0:
                self.transport.disconnect(self.peer[w], False)
        self.transport.flush()
        self.transport = None

    def __enter__(self) -> Root:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- failures and re-planning ----------------------------------------------------------
    def _drop(self, w: int, why: str) -> None:
        if not self.alive[w]:
            return
        self.alive[w] = False
        self.stats.dead[w] = why
        self._say(f"worker {self._name(w)} dropped: {why}")
        if self.transport is not None and self.peer[w] >= 0:
            self.transport.disconnect(self.peer[w], True)
        if not any(self.alive):
            raise EdgeError(f"all workers lost (last: {self._name(w)} {why})")

    def _replan(self, reason: str) -> None:
        for _ in range(len(self.addresses)):
            live = [w for w in range(len(self.addresses)) if self.alive[w]]
            if not live:
                raise EdgeError("all workers lost")
            devices = list(self.devices)
            if self.options.policy == "halo":
                devices = [
                    replace(d, plr=min(max(self.monitor.plr(i), 0.0), 0.99)) if self._observed[i] >= 20 else d
                    for i, d in enumerate(devices)
                ]
            before = self.assignment
            after = assign_groups(
                self.spec,
                self.groups,
                self.plan.importance,
                devices,
                self.plan.placement,
                self.plan.loss_budget,
                live,
            )
            moved = sum(
                a != b for la, lb in zip(before, after) for pa, pb in zip(la, lb) for a, b in zip(pa, pb)
            )
            t0 = time.monotonic()
            if moved == 0 and all(self.alive[w] for la in before for pa in la for w in pa):
                self.devices = devices
                self.monitor.mark()
                return  # the new estimates place every group where it already is
            dead_before = sum(not a for a in self.alive)
            self._distribute(after, fatal=False, replay=True, before=before)
            if sum(not a for a in self.alive) != dead_before:
                continue  # someone failed while taking groups: place again without it
            self.assignment = after
            self.devices = devices
            self.monitor.mark()
            self.stats.replans.append(
                {"reason": reason, "moved": moved, "seconds": time.monotonic() - t0, "workers": live}
            )
            self._say(f"re-planned ({reason}): {moved} groups moved in {time.monotonic() - t0:.2f} s")
            return
        raise EdgeError("re-planning kept failing")

    # -- one exchange ----------------------------------------------------------------------
    def _next_step(self) -> int:
        self._step += 1
        return self._step

    def _critical(self, layer: int, part: int, h: np.ndarray) -> np.ndarray:
        return self.policy.critical(layer, part, h)

    def _deadlines(self, part: int, rows: int, workers: list[int], t0: float) -> tuple[float, float]:
        hard = t0 + self.hard_timeout
        if self.wait_all:
            return hard, hard

        def estimate(n: int) -> float | None:
            mon = self.latency.get((part, n))
            if mon is None or any(self.latency_count.get((part, n, w), 0) < 3 for w in workers):
                return None
            return max(mon.latency(w) for w in workers)

        late = estimate(rows)
        if late is None and rows > 1 and estimate(1) is not None:
            late = estimate(1) * rows  # a first prefill of this length: scale the decode estimate
        if late is None:
            # Nothing measured yet: a generous fixed deadline while the monitor learns.
            return min(t0 + self.options.initial_deadline, hard), hard
        deadline = t0 + late * self.options.deadline_factor + self.options.deadline_slack
        return min(deadline, hard), max(hard, t0 + 50 * late)

    def _exchange(self, layer: int, part: int, h, pos: int):
        import torch

        x = np.ascontiguousarray(h.detach().numpy(), dtype=np.float32)
        rows, hidden = x.shape
        if part == ATTN and self.spec.family == "llama":
            if pos == 0:
                self.history[layer] = []
            self.history[layer].append(x)
        owners = self.assignment[layer][part]
        count = len(owners)
        critical = self._critical(layer, part, x)
        peer_of_group = [self.peer[w] if self.alive[w] else -1 for w in owners]
        workers = sorted({w for w in owners if self.alive[w]})
        step = self._next_step()
        duplicate = (
            self.options.policy == "halo"
            and self.options.duplicate_critical
            and 64 + 2 * count + 2 * x.size <= self.transport.datagram_payload
        )
        t0 = time.monotonic()
        for w in workers:
            mine = [i for i in range(count) if owners[i] == w and critical[i]]
            if duplicate:
                self.transport.send_input(self.peer[w], step, pos, layer, part, mine, x, "unreliable")
            self.transport.send_input(self.peer[w], step, pos, layer, part, mine, x, "control")
        deadline, hard = self._deadlines(part, rows, workers, t0)
        out = np.zeros((count, rows, hidden), dtype=np.float32)
        r = self.transport.gather(
            step, layer, part, out, peer_of_group, list(critical), deadline, hard, self.wait_all
        )
        self.stats.stale += r["stale"]
        self.stats.duplicates += r["duplicates"]
        self.stats.malformed += r["malformed"]
        received = r["received"].astype(bool)
        by_peer = {self.peer[w]: w for w in workers}
        failed: dict[int, str] = {}
        self._check_terms(out, received, owners, failed)
        for event in r["other"]:
            if event is None:
                continue
            what, peer, data, _ = event
            w = by_peer.get(peer)
            if w is None:
                continue
            if what == "disconnect":
                failed[w] = "disconnected"
            elif what == "message":
                try:
                    msg = _edge.decode(data)
                    body = parse_control(msg["json"], self._json_limit) if msg["kind"] == "control" else {}
                except (ValueError, KeyError):
                    self.stats.malformed += 1
                    continue
                if body.get("type") == "error":
                    failed[w] = "reported: " + str(body.get("message", ""))[:300]
        # Silent: nothing at all from a worker during silent_timeout seconds of exchanges that
        # waited for it (a lossy worker still gets some packets through; its missing rows
        # are compensated, and the monitor moves groups away from it).
        end = time.monotonic()
        heard = {by_peer[peer] for _, _, peer, _ in r["late"] if peer in by_peer}
        heard |= {
            w for w in workers if self.peer[w] < len(r["peer_heard"]) and r["peer_heard"][self.peer[w]] > 0
        }
        for w in workers:
            self._unheard[w] = 0.0 if w in heard else self._unheard[w] + (end - t0)
            if w not in failed and self._unheard[w] >= self.silent_timeout:
                failed[w] = f"silent for {self.silent_timeout:g} s"
        self._monitor(step, t0, part, rows, owners, received, failed, r)
        self._compensate(layer, part, x, out, received, owners)
        self.stats.exchanges.append(
            Exchange(
                step,
                layer,
                part,
                rows,
                time.monotonic() - t0,
                rows * sum(1 for w in owners if self.alive[w]),
                int(received.sum()),
                rows * int(critical.sum()),
                r["end"],
            )
        )
        if failed:
            for w, why in failed.items():
                self._drop(w, why)
            self._replan("worker lost")
        return torch.from_numpy(out.sum(0))

    def _check_terms(self, out, received, owners, failed: dict[int, str]) -> None:
        """Rows with NaN or infinite values count as lost (zeroed, compensated, counted in
        ``stats.rejected``); a worker that sends them in BAD_TERM_EXCHANGES exchanges is dropped."""
        bad = received & ~np.isfinite(out).all(axis=2)
        if not bad.any():
            return
        out[bad] = 0
        received &= ~bad
        self.stats.rejected += int(bad.sum())
        for w in sorted({owners[g] for g in np.flatnonzero(bad.any(axis=1))}):
            self._bad_terms[w] += 1
            if self._bad_terms[w] >= BAD_TERM_EXCHANGES and w not in failed:
                failed[w] = f"sent non-finite terms in {self._bad_terms[w]} exchanges"

    def _monitor(self, step: int, t0: float, part: int, rows: int, owners, received, failed, r) -> None:
        """Feeds the monitors: per group delivered or lost, and each worker's latency. A term
        missed at the deadline is only counted lost if it does not turn up late within a few
        exchanges (late ones are latency samples instead), so a slow or busy worker raises
        the deadline rather than looking lossy."""
        W = len(self.addresses)
        key = (part, rows)
        mon = self.latency.setdefault(key, sched.Monitor(W, alpha=self.options.monitor_alpha))
        for late_step, group, _peer, when in r["late"]:
            miss = self._missed.pop((late_step, group), None)
            if miss is None:
                continue
            w, (t_start, late_key) = miss
            self.monitor.observe(w, True, 0.0)
            self.latency[late_key].observe(w, True, max(when - t_start, 0.0))
            self.latency_count[(*late_key, w)] = self.latency_count.get((*late_key, w), 0) + 1
        missing = r["peer_missing"]
        for i, w in enumerate(owners):
            if not self.alive[w] or w in failed:
                continue
            self._observed[w] += 1
            if received[i].all():
                self.monitor.observe(w, True, 0.0)
            else:
                self._missed[(step, i)] = (w, (t0, key))
        for w in sorted(set(owners)):
            peer = self.peer[w]
            delivered_all = peer < len(missing) and missing[peer] == 0 and r["peer_last"][peer] > 0
            if self.alive[w] and w not in failed and delivered_all:
                mon.observe(w, True, max(r["peer_last"][peer] - t0, 0.0))
                self.latency_count[(*key, w)] = self.latency_count.get((*key, w), 0) + 1
        for old in [k for k in self._missed if k[0] < step - 16]:
            w, _ = self._missed.pop(old)
            if self.alive[w]:
                self.monitor.observe(w, False, 0.0)

    def _compensate(self, layer: int, part: int, x, out, received, owners) -> None:
        self.policy.compensate(layer, part, x, out, received)

    # -- forwards --------------------------------------------------------------------------
    def forward(self, ids: Sequence[int], pos: int):
        import torch

        if self.transport is None:
            raise EdgeError("not connected (use 'with Root(...)' or call connect())")
        with torch.no_grad():
            out = self.model.forward(ids, pos, self._exchange)
        if (
            self.options.policy == "halo"
            and self.options.replan
            and min(self._observed[w] for w in range(len(self.alive)) if self.alive[w]) >= 100
            and self.monitor.drifted(self.options.drift_threshold)
        ):
            self._replan("loss estimate drifted")
        return out


def run(
    model: str,
    workers: Sequence[str],
    plan: Plan | str,
    policy: str = "halo",
    tokens: int = 16,
    prompt: str = "",
    log: TextIO | None = sys.stderr,
    key: bytes | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``halo edge run``: generate ``tokens`` tokens after ``prompt`` (LLaMA) or embed the
    prompt (BERT) on the workers; returns the text/embedding, timings and delivery figures."""
    from .plan import tokenize

    root = Root(
        model, workers, plan, policy=policy, log=log, key=key, **options
    )  # checks plan and workers first
    spec = root.spec
    if tokens < 1:
        raise EdgeError(f"tokens must be >= 1, got {tokens}")
    ids = tokenize(model, prompt)
    if not ids:
        raise EdgeError("the prompt is empty")
    with root:
        if spec.family == "bert":
            t0 = time.monotonic()
            vector = root.embed(ids)
            result: dict[str, Any] = {"embedding": vector.tolist(), "forward_s": time.monotonic() - t0}
        else:
            result = root.generate(ids, tokens)
            from transformers import AutoTokenizer

            result["text"] = AutoTokenizer.from_pretrained(model).decode(result["tokens"])
        result.update(
            policy=policy,
            delivered=root.stats.delivered_fraction(),
            replans=root.stats.replans,
            dropped={root._name(w): why for w, why in root.stats.dead.items()},
            rejected=root.stats.rejected,
            malformed=root.stats.malformed,
        )
    return result
