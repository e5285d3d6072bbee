"""Compute on whatever part of a ``GroupStore`` is resident at each exchange's deadline.

* ``StreamedCompute`` runs an exchange on the groups resident at its start: a missing group is
  left out like a lost packet and the caller compensates it, so loading never stalls a step. A
  missing attention group's key/value cache is caught up from the kept layer inputs when the
  group is back.
* ``WorkerStreaming`` serves a root from a store (``halo edge worker --memory-budget``).
* ``StreamedLocal`` runs a whole model in one process from the store with a budget below its
  size (``halo edge local``).

The store itself (format, building, the budgeted loader) is :mod:`halo.edge.store`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .compute import GroupCompute, RootModel
from .model import (
    ATTN,
    FFN,
    Checkpoint,
    EdgeError,
    GroupDef,
    Spec,
    fingerprint,
    layout,
    read_spec,
    tensor_names,
)
from .runner import Runner
from .store import MODES, GroupStore, Key, default_store_path, ensure_store, parse_budget, peek_meta

if TYPE_CHECKING:
    from typing_extensions import Self


def input_norms(checkpoint: Checkpoint, spec: Spec) -> dict[tuple[int, int], np.ndarray] | None:
    """LLaMA: the RMSNorm weight in front of each exchange (to move a layer input to another
    layer's normalisation for look-ahead scoring); BERT feeds the residual itself: None."""
    if spec.family != "llama":
        return None
    out = {}
    for layer in range(spec.layers):
        names = tensor_names(spec, layer)
        out[(layer, ATTN)] = checkpoint.get(names["ln_attn"] + ".weight").numpy().astype(np.float64)
        out[(layer, FFN)] = checkpoint.get(names["ln_ffn"] + ".weight").numpy().astype(np.float64)
    return out


def static_shares(importance: list[list[list[float]]] | None, groups) -> dict[Key, float]:
    """Each group's share of its exchange's total importance (uniform without importance)."""
    out: dict[Key, float] = {}
    for layer in groups:
        for part in layer:
            if not part:
                continue
            if importance is None:
                values = np.ones(len(part))
            else:
                values = np.maximum(
                    np.asarray(importance[part[0].layer][part[0].part], dtype=np.float64), 0.0
                )
            total = values.sum()
            shares = values / total if total > 0 else np.full(len(part), 1.0 / len(part))
            for g, s in zip(part, shares):
                out[g.key] = float(s)
    return out


class StreamedCompute:
    """``GroupCompute`` on a ``GroupStore``: one exchange at a time, on the groups resident at
    its start. ``run`` returns one term per group, None for a group that was missing.

    predictors: {(layer, part): predictor.PartPredictor} (look-ahead scores; None: static only)
    lookahead:  exchanges ahead the predictor scores at each exchange
    on_missing: "skip" (compensated by the caller) or "load" (read now: load-on-demand)"""

    def __init__(
        self,
        spec: Spec,
        store: GroupStore,
        predictors: dict | None = None,
        norms: dict | None = None,
        lookahead: int = 1,
        on_missing: str = "skip",
    ) -> None:
        if on_missing not in ("skip", "load"):
            raise EdgeError(f"on_missing must be 'skip' or 'load', got {on_missing!r}")
        self.spec, self.store = spec, store
        self.inner = GroupCompute(spec, store)
        self.predictors = predictors or {}
        self.norms = norms
        self.lookahead = int(lookahead)
        self.on_missing = on_missing
        self.order = [(layer, part) for layer in range(spec.layers) for part in (ATTN, FFN)]
        self._by_exchange: dict[tuple[int, int], list[GroupDef]] = {}
        self._by_exchange_generation = -1
        self.missing = 0  # groups left out at their deadline
        self.computed = 0
        self.caught_up = 0  # key/value rows rebuilt for attention groups that had been missing
        self._valid: dict[tuple[int, int], int] = {}  # (layer, kv head) -> cache rows valid now
        self._history: dict[int, list[tuple[int, Any]]] = {}  # layer -> [(pos, rows)] of attention inputs
        self._seq_end: dict[int, int] = {}

    @property
    def by_exchange(self) -> dict[tuple[int, int], list[GroupDef]]:
        """The held groups of each exchange (recomputed when the store's share changes)."""
        if self._by_exchange_generation != self.store.generation:
            out: dict[tuple[int, int], list[GroupDef]] = {}
            for key in sorted(self.store.held):
                g = self.store._defs[key]
                out.setdefault((g.layer, g.part), []).append(g)
            self._by_exchange, self._by_exchange_generation = out, self.store.generation
        return self._by_exchange

    def reset(self) -> None:
        self.inner.reset()
        self._valid.clear()
        self._history.clear()
        self._seq_end.clear()

    def _schedule(self, layer: int, part: int, h) -> None:
        """Scores the next exchanges' groups with their predictors from this input."""
        if not self.predictors or self.lookahead <= 0:
            return
        here = layer * 2 + part
        x = h.detach().numpy().astype(np.float64) if hasattr(h, "detach") else np.asarray(h, np.float64)
        base = None
        if self.norms is not None:
            w = self.norms[(layer, part)]
            base = np.divide(x, w, out=np.zeros_like(x), where=w != 0)
        keys, values = [], []
        for step in range(1, self.lookahead + 1):
            target = self.order[(here + step) % len(self.order)]
            mine = self.by_exchange.get(target)
            p = self.predictors.get(target)
            if not mine or p is None:
                continue
            u = base * self.norms[target] if base is not None else x
            scores = np.maximum(p.scores(u).mean(0), 0.0)
            total = scores.sum()
            shares = scores / total if total > 0 else np.full(scores.shape, 1.0 / len(scores))
            shares = np.maximum(shares, 1e-6)  # importance 0 would mean "never load"
            for g in mine:
                keys.append(g.key)
                values.append(float(shares[g.index]))
        if keys:
            self.store.set_importance(keys, values)

    def run(
        self, groups: list[GroupDef], h, pos: int, replay: bool = False, must: Iterable[int] = ()
    ) -> list[Any]:
        """Terms of ``groups`` (one layer and part) for input h [n, hidden] at position pos;
        None where a group was not resident at the start (unless its index is in ``must``,
        or on_missing is "load": then it is read now)."""
        if not groups:
            return []
        layer, part = groups[0].layer, groups[0].part
        keys = [g.key for g in groups]
        if replay:
            return self._replay(groups, h, pos)
        # The deadline: take what is resident (in use: not evictable), then let the loaders
        # move on (advancing first would let them evict this exchange's groups right away).
        here = self.store.acquire(keys)
        self.store.advance(layer, part)
        self._schedule(layer, part, h)
        must = set(must)
        later = []  # to read now, but no room beside this exchange's other groups: one at a time
        for i, g in enumerate(groups):
            if not here[i] and (self.on_missing == "load" or g.index in must):
                here[i] = self.store.load_now(g.key)
                if not here[i]:
                    later.append(g)
        present = [g for g, ok in zip(groups, here) if ok]
        terms: dict[Key, Any] = {}
        try:
            present = self._catch_up(layer, part, present, h, pos)
            terms.update(zip((g.key for g in present), self.inner.run(present, h, pos)))
        finally:
            self.store.release([g.key for g, ok in zip(groups, here) if ok])
        for g in later:
            if not self.store.load_now(g.key):
                continue  # a bad group (see errors()) or a budget full of pinned groups
            try:
                done = self._catch_up(layer, part, [g], h, pos)
                if done:
                    terms[g.key] = self.inner.run(done, h, pos)[0]
                    present.append(g)
            finally:
                self.store.release([g.key])
        self._record(layer, part, present, h, pos)
        self.computed += len(present)
        self.missing += len(groups) - len(present)
        return [terms.get(k) for k in keys]

    # -- key/value caches of attention groups that were missing -----------------------------
    def _llama_attention(self, part: int) -> bool:
        return part == ATTN and self.spec.family == "llama"

    def _catch_up(self, layer: int, part: int, present: list[GroupDef], h, pos: int) -> list[GroupDef]:
        if not self._llama_attention(part):
            return present
        if pos < self._seq_end.get(layer, 0):  # a new sequence (or a rewind): later rows are void
            for key in list(self._valid):
                if key[0] == layer:
                    self._valid[key] = min(self._valid[key], pos)
            self._history[layer] = [(p, r) for p, r in self._history.get(layer, []) if p + r.shape[0] <= pos]
        out = []
        for g in present:
            need = min(self._valid.get((layer, kv), 0) for kv in g.kv)
            if need < pos:
                rows = self._rows(layer, need, pos)
                if rows is None:
                    continue  # its inputs are gone: it stays out for the rest of this sequence
                self.inner.run([g], rows, need, replay=True)
                self.caught_up += rows.shape[0]
                for kv in g.kv:
                    self._valid[(layer, kv)] = pos
            out.append(g)
        return out

    def _rows(self, layer: int, start: int, stop: int):
        import torch

        chunks = [(p, r) for p, r in self._history.get(layer, []) if p < stop and p + r.shape[0] > start]
        if not chunks or chunks[0][0] > start:
            return None
        rows = torch.cat([r for _, r in chunks])
        first = chunks[0][0]
        return rows[start - first : stop - first]

    def _record(self, layer: int, part: int, present: list[GroupDef], h, pos: int) -> None:
        if not self._llama_attention(part):
            return
        n = h.shape[0]
        for g in present:
            for kv in g.kv:
                self._valid[(layer, kv)] = pos + n
        self._seq_end[layer] = pos + n
        history = [*self._history.get(layer, []), (pos, h.detach().clone())]
        # Keep only the rows some held attention group may still need to catch up.
        kv_heads = {kv for g in self.by_exchange.get((layer, ATTN), []) for kv in g.kv}
        oldest = min((self._valid.get((layer, kv), 0) for kv in kv_heads), default=pos + n)
        self._history[layer] = [(p, r) for p, r in history if p + r.shape[0] > oldest]

    def _replay(self, groups: list[GroupDef], h, pos: int) -> list[Any]:
        """Rebuilds the key/value caches of groups that moved here (a re-plan): read now."""
        layer = groups[0].layer
        present = [g for g in groups if self.store.load_now(g.key)]
        try:
            present = self._catch_up(layer, ATTN, present, h, pos)
            self.inner.run(present, h, pos, replay=True)
        finally:
            self.store.release([g.key for g in present])
        self._record(layer, ATTN, present, h, pos)
        return []


# ----------------------------------------------------------------------------------------------
# An edge worker with less memory than its share


class WorkerStreaming:
    """``halo edge worker --memory-budget``: how a worker opens its groups. Group stores live in
    ``store_dir`` (one per model and group layout): an existing one is used; a missing one is
    built only for the layout of a plan the worker was started with (``plans``: edge plans or
    their paths on this host, which also give static importance and predictors), so what a
    root asks for never makes the worker write an unbounded number of files. Under
    wait-for-all delivery (tcp, reliable-udp) a missing group is read at once: the root waits
    for every term anyway."""

    def __init__(
        self,
        budget: float,
        store_dir: str | os.PathLike | None = None,
        window_exchanges: int = 4,
        loader_threads: int = 4,
        log: Any = None,
        read_bandwidth: float = 0.0,
        plans: Sequence[Any] = (),
    ) -> None:
        from .plan import Plan, load_plan

        self.budget = parse_budget(budget)
        self.store_dir, self.window_exchanges = store_dir, window_exchanges
        self.loader_threads, self.log = loader_threads, log
        self.read_bandwidth = read_bandwidth  # bytes/s: emulates a slower disk (tests); 0: none
        self.plans = [p if isinstance(p, Plan) else load_plan(p) for p in plans]
        self.last: tuple[GroupStore, StreamedCompute] | None = None  # the latest session's

    def check_plans(self, models: dict[str, Any]) -> None:
        """Every plan must be for one of the worker's models ({fingerprint: worker.Served})."""
        from .plan import check_plan_shape

        for plan in self.plans:
            served = models.get(plan.fingerprint)
            if served is None:
                raise EdgeError(f"{plan.path}: the plan is for a model this worker does not serve")
            check_plan_shape(plan, served.spec, str(plan.path))

    def open(
        self, model: str, spec: Spec, groups, model_fingerprint: str, wait_all: bool
    ) -> tuple[GroupStore, StreamedCompute]:
        from .predictor import load_predictors

        first = groups[0]
        group_size = first[FFN][0].stop - first[FFN][0].start if first[FFN] else spec.inter
        hpg = len(first[ATTN][0].heads) if first[ATTN] else 1
        plan = next(
            (
                p
                for p in self.plans
                if (p.fingerprint, p.group_size, p.heads_per_group) == (model_fingerprint, group_size, hpg)
            ),
            None,
        )
        path = default_store_path(model, group_size, hpg, directory=self.store_dir)
        if not path.exists() and plan is None:
            from .link import Refused

            raise Refused(
                f"no group store here for groups of {group_size} neurons and {hpg} heads "
                "(the worker builds stores only for the layouts of its plans)"
            )
        path = ensure_store(model, group_size, hpg, path=path)
        shares, predictors = None, {}
        if plan is not None:
            shares = static_shares(plan.importance, groups)
            if plan.predictor_path() is not None:
                predictors = load_predictors(plan.predictor_path(), spec, groups)
        store = GroupStore(
            path,
            spec,
            groups,
            model_fingerprint,
            budget=self.budget,
            shares=shares,
            window_exchanges=self.window_exchanges,
            loader_threads=self.loader_threads,
            read_bandwidth=self.read_bandwidth,
            held=(),
        )
        compute = StreamedCompute(
            spec,
            store,
            predictors=predictors or None,
            norms=input_norms(Checkpoint(model), spec) if predictors else None,
            on_missing="load" if wait_all else "skip",
        )
        self.last = (store, compute)
        return store, compute


# ----------------------------------------------------------------------------------------------
# One process, no network


class StreamedLocal(Runner):
    """Runs a LLaMA/BERT model in this process from a group store with a memory budget.

    plan: an edge plan (path or Plan) with predictors, used for importance, look-ahead scores
    and compensation; with mode 'demand', 'mmap' or 'resident' it may be None.
    compensation: what stands in for a missing group's term: 'zero' (default: on SmolLM2 the
    plan's low-rank estimate of an FFN group's term does more harm than leaving it out, see
    docs/partition.md) or 'predictor'."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        store_path: str | os.PathLike,
        plan: Any = None,
        budget: float | None = None,
        mode: str = "predict",
        compensation: str = "zero",
        lookahead: int = 1,
        drop_page_cache: bool = True,
        window_exchanges: int = 4,
        loader_threads: int = 4,
        read_bandwidth: float = 0.0,
    ) -> None:
        from .plan import Plan, load_plan
        from .predictor import load_predictors

        if mode not in MODES:
            raise EdgeError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if compensation not in ("predictor", "zero"):
            raise EdgeError(f"compensation must be 'predictor' or 'zero', got {compensation!r}")
        self.spec = read_spec(model_dir)
        fp = fingerprint(model_dir)
        if plan is not None and not isinstance(plan, Plan):
            plan = load_plan(plan, self.spec, fp)
        self.plan = plan
        if plan is not None:
            group_size, hpg = plan.group_size, plan.heads_per_group
        else:
            meta = json.loads(peek_meta(store_path))
            group_size, hpg = int(meta.get("group_size", 128)), int(meta.get("heads_per_group", 1))
        self.groups = layout(self.spec, group_size, hpg)
        predictors = {}
        if plan is not None and plan.predictor_path() is not None:
            predictors = load_predictors(plan.predictor_path(), self.spec, self.groups)
        if mode in ("predict",) and not predictors:
            raise EdgeError(
                "mode 'predict' needs a plan with predictors (make_plan with calibration_tokens > 0)"
            )
        if compensation == "predictor" and mode in ("predict", "static") and not predictors:
            raise EdgeError("compensation 'predictor' needs a plan with predictors")
        self.predictors = predictors
        self.mode, self.compensation = mode, compensation
        checkpoint = Checkpoint(model_dir)
        self.model = RootModel(checkpoint, self.spec)
        if mode == "resident":
            budget = None
        loader = mode in ("predict", "static")
        self.store = GroupStore(
            store_path,
            self.spec,
            self.groups,
            fp,
            budget=budget,
            mode="mmap" if mode == "mmap" else "resident",
            prefetch=loader,
            drop_page_cache=drop_page_cache,
            shares=static_shares(plan.importance if plan is not None else None, self.groups)
            if loader
            else None,
            pin=loader,
            window_exchanges=window_exchanges,
            loader_threads=loader_threads,
            read_bandwidth=read_bandwidth,
        )
        self.compute = StreamedCompute(
            self.spec,
            self.store,
            predictors=predictors if mode == "predict" else None,
            norms=input_norms(checkpoint, self.spec) if mode == "predict" else None,
            lookahead=lookahead,
            on_missing="load" if mode == "demand" else "skip",
        )
        self.store.hold(g for layer in self.groups for part in layer for g in part)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self) -> None:
        self.compute.reset()

    def _exchange(self, layer: int, part: int, h, pos: int):
        import torch

        groups = self.groups[layer][part]
        terms = self.compute.run(groups, h, pos)
        lost = [i for i, t in enumerate(terms) if t is None]
        if lost:
            p = self.predictors.get((layer, part)) if self.compensation == "predictor" else None
            x = h.detach().numpy().astype(np.float32)
            for i in lost:
                terms[i] = torch.from_numpy(p.estimate(x, i)) if p is not None else torch.zeros_like(h)
        return torch.stack(terms).sum(0)

    def forward(self, ids: Sequence[int], pos: int):
        import torch

        with torch.no_grad():
            return self.model.forward(ids, pos, self._exchange)

    def stats(self) -> dict[str, Any]:
        s = dict(self.store.stats())
        total = self.compute.missing + self.compute.computed
        s.update(
            missing=self.compute.missing,
            computed=self.compute.computed,
            missing_fraction=self.compute.missing / total if total else 0.0,
            caught_up_rows=self.compute.caught_up,
            budget=self.store.budget,
            held_bytes=self.store.held_bytes(),
        )
        return s


__all__ = ["StreamedCompute", "StreamedLocal", "WorkerStreaming", "input_norms", "static_shares"]
