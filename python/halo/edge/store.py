"""Devices smaller than their share: neuron-group weights streamed from a local 4-bit store.

HALO's second mechanism (arXiv 2601.11676): a device that cannot hold all the weights of
its groups keeps them on local disk and loads the ones it will need next while it
computes. Here:

* ``build_store`` writes every group of a model (``edge_model.layout``) to one file in
  halo's 4-bit layout (NF4 via ``halo.quantize_4bit``; biases as float32), with a
  versioned, checksummed header and index (``halo._core.edge_store``; format in
  include/halo/edge/group_store.hpp).
* ``GroupStore`` keeps at most a memory budget of groups resident. Loader threads (C++)
  read, while the current exchange computes, the groups needed soonest and, within an
  exchange, the most important per byte first (importance: the semantic predictor's score
  for the next exchange, static importance otherwise). Eviction takes the groups needed
  latest (the ones just used: recency), then the least important. The most important
  groups are pinned first; see docs/partition.md.
* ``StreamedCompute`` runs an exchange on whatever is resident at its start (the deadline):
  a missing group is left out like a lost packet and the caller compensates it, so loading
  never stalls a step. A missing attention group's key/value cache is caught up from the
  kept layer inputs when the group is back.
* ``StreamedLocal`` runs a whole model in one process from the store with a budget below
  its size (``halo edge local``); ``halo edge worker --memory-budget`` serves a root so.

Modes: ``predict`` (loader + predictor; missing groups compensated with zero by default, with
the plan's estimate on request), ``static`` (loader with
static importance only), ``demand`` (no loader: a missing group is read synchronously, the
load-on-demand baseline), ``mmap`` (the whole file mapped, the kernel pages it in, page
cache capped at the budget: the llama.cpp ``--mmap`` baseline) and ``resident`` (every
group loaded first: the all-resident reference).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._core import edge_store as _store
from .model import (
    ATTN,
    FFN,
    Checkpoint,
    EdgeError,
    GroupCompute,
    GroupDef,
    GroupWeights,
    RootModel,
    Spec,
    WeightStore,
    default_heads_per_group,
    fingerprint,
    layout,
    read_spec,
    tensor_names,
)
from .root import Runner

if TYPE_CHECKING:
    from typing_extensions import Self

STORE_FORMAT = "halo-edge-groups"
MODES = ("predict", "static", "demand", "mmap", "resident")
Key = tuple[int, int, int]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}
_UNITS.update({"g": 1000**3, "gb": 1000**3, "gib": 1024**3})


def parse_budget(text: str | float) -> int | float:
    """``"512MiB"`` -> bytes (int); ``"25%"`` -> 0.25 (a fraction of the worker's weights)."""
    if isinstance(text, bool):
        raise EdgeError(f"memory budget must be a size like 512MiB or a percentage, got {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise EdgeError(f"memory budget must be positive, got {text}")
        return text
    if isinstance(text, float):
        if not 0 < text <= 1:
            raise EdgeError(f"a fractional memory budget must be in (0, 1], got {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*", str(text))
    if match is None:
        raise EdgeError(f"memory budget must be a size like 512MiB or a percentage like 25%, got {text!r}")
    value, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        if not 0 < value <= 100:
            raise EdgeError(f"a percentage memory budget must be in (0, 100], got {text!r}")
        return value / 100.0
    if unit not in _UNITS:
        raise EdgeError(
            f"unknown size unit {match.group(2)!r} in memory budget {text!r} (B, KiB, MiB, GiB, KB, MB, GB)"
        )
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise EdgeError(f"memory budget must be positive, got {text!r}")
    return size


# ----------------------------------------------------------------------------------------------
# Building the file


def _tensors_of(spec: Spec, g: GroupDef) -> list[tuple[str, int, int, bool]]:
    """(name, rows, cols, is_weight) of a group's tensors, as ``WeightStore`` holds them."""
    d, h = spec.head_dim, spec.hidden
    if g.part == ATTN:
        q, kv = len(g.heads) * d, len(g.kv) * d
        out = [("q", q, h, True), ("k", kv, h, True), ("v", kv, h, True), ("o", h, q, True)]
        if spec.family == "bert":
            out += [("q_bias", 1, q, False), ("k_bias", 1, kv, False), ("v_bias", 1, kv, False)]
        return out
    n = g.stop - g.start
    out = [("up", n, h, True), ("down", h, n, True)]
    out += [("gate", n, h, True)] if spec.family == "llama" else [("up_bias", 1, n, False)]
    return out


def store_meta(
    model_dir: str | os.PathLike,
    spec: Spec,
    group_size: int,
    heads_per_group: int,
    quant: str,
    blocksize: int,
) -> dict[str, Any]:
    return {
        "format": STORE_FORMAT,
        "fingerprint": fingerprint(model_dir),
        "family": spec.family,
        "layers": spec.layers,
        "hidden": spec.hidden,
        "group_size": group_size,
        "heads_per_group": heads_per_group,
        "quant": quant,
        "blocksize": blocksize,
    }


def build_store(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    group_size: int = 128,
    heads_per_group: int | None = None,
    quant: str = "nf4",
    blocksize: int = 64,
    force: bool = False,
) -> Path:
    """Writes every neuron group of the model to ``out`` in 4-bit (through ``halo._output``'s
    guard: never over an input, a temporary file renamed into place, ``force`` replaces only
    an existing group store). Returns the path."""
    from .. import _output

    if quant not in ("nf4", "fp4"):
        raise EdgeError(f"quant must be 'nf4' or 'fp4', got {quant!r}")
    spec = read_spec(model_dir)
    hpg = default_heads_per_group(spec) if heads_per_group is None else heads_per_group
    groups = [g for layer in layout(spec, group_size, hpg) for part in layer for g in part]
    plan = []
    for g in groups:
        tensors = [
            (name, quant if weight else "f32", blocksize, rows, cols)
            for name, rows, cols, weight in _tensors_of(spec, g)
        ]
        plan.append((g.key, tensors))
    meta = store_meta(model_dir, spec, group_size, hpg, quant, blocksize)
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise EdgeError(f"{out.parent}: no such directory for the group store")
    try:
        guard = _output.check("edge store", out, [(model_dir, "model folder")], "file", force, _is_store)
    except ValueError as exc:
        raise EdgeError(str(exc)) from None
    with guard.writing():
        _write_store(guard.temp, meta, plan, model_dir, spec, groups, quant, blocksize)
        guard.commit()
    return out


def _is_store(path: Path) -> bool:
    return json.loads(_peek_meta(path)).get("format") == STORE_FORMAT


def _write_store(temp: Path, meta, plan, model_dir, spec: Spec, groups, quant: str, blocksize: int) -> None:
    from ..quant import quantize_4bit

    try:
        writer = _store.Writer(str(temp), json.dumps(meta), plan)
    except (ValueError, RuntimeError) as exc:
        raise EdgeError(str(exc)) from None
    source = WeightStore(Checkpoint(model_dir), spec)
    try:
        for g in groups:
            mats = source._load(g).mats
            data = []
            for name, _rows, _cols, weight in _tensors_of(spec, g):
                values = mats[name].numpy().astype(np.float32, copy=False)
                if weight:
                    q = quantize_4bit(values, quant_type=quant, blocksize=blocksize)
                    data.append(
                        (np.ascontiguousarray(q.packed).reshape(-1), np.ascontiguousarray(q.absmax), None)
                    )
                else:
                    data.append((None, None, values.reshape(1, -1)))
            writer.write_group(g.key, data)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def default_store_path(
    model_dir: str | os.PathLike,
    group_size: int,
    heads_per_group: int,
    quant: str = "nf4",
    blocksize: int = 64,
    directory: str | os.PathLike | None = None,
) -> Path:
    base = (
        Path(directory or os.environ.get("HALO_CACHE_DIR") or Path.home() / ".cache" / "halo") / "edge-stores"
    )
    return base / f"{fingerprint(model_dir)}-g{group_size}-h{heads_per_group}-{quant}-b{blocksize}.halogrp"


def ensure_store(
    model_dir: str | os.PathLike,
    group_size: int,
    heads_per_group: int,
    path: str | os.PathLike | None = None,
    directory: str | os.PathLike | None = None,
) -> Path:
    """The model's group store at ``path`` (default: a cache folder), built when missing."""
    target = (
        Path(path)
        if path is not None
        else default_store_path(model_dir, group_size, heads_per_group, directory=directory)
    )
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        build_store(model_dir, target, group_size, heads_per_group)
    return target


# ----------------------------------------------------------------------------------------------
# The store as the runtime sees it


class Q4Linear:
    """A handle on one 4-bit matrix of a resident group: ``F.linear(x, handle, bias)`` runs
    halo's 4-bit kernel on it (through ``__torch_function__``), never a float copy of it."""

    __slots__ = ("key", "name", "store")

    def __init__(self, store: Any, key: Key, name: str) -> None:
        self.store, self.key, self.name = store, key, name

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        import torch

        kwargs = kwargs or {}
        if func is not torch.nn.functional.linear:
            raise TypeError(
                f"[Q4Linear] only F.linear takes a 4-bit group weight, got {getattr(func, '__name__', func)}"
            )
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        rows = x.detach().reshape(-1, x.shape[-1]).contiguous().float().numpy()
        y = torch.from_numpy(weight.store.linear(weight.key, weight.name, rows))
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


class GroupStore:
    """A budgeted set of a model's groups from a store file; ``hold``/``get``/``keys`` as
    ``edge_model.WeightStore`` (so ``GroupCompute`` and the edge worker run on it), plus the
    loader's controls.

    budget:   bytes, a fraction of the held groups' bytes, or None (everything resident)
    mode:     ``resident`` or ``mmap`` (the C++ store's two modes); ``prefetch`` runs the loaders
    shares:   static importance of each group (its share of its exchange, see ``static_shares``)
    pin:      pin the most important groups (per byte) into what the budget leaves beside a
              window of ``window_exchanges`` exchanges for the loaders
    read_bandwidth: bytes/s cap on reads (emulates a slower disk; 0: none)"""

    def __init__(
        self,
        path: str | os.PathLike,
        spec: Spec,
        groups: list[list[list[GroupDef]]],
        model_fingerprint: str | None = None,
        budget: float | None = None,
        mode: str = "resident",
        prefetch: bool = True,
        drop_page_cache: bool = True,
        shares: dict[Key, float] | None = None,
        pin: bool = True,
        window_exchanges: int = 4,
        loader_threads: int = 4,
        read_bandwidth: float = 0.0,
        held: Iterable[Key] | None = None,
    ) -> None:
        if mode not in ("resident", "mmap"):
            raise EdgeError(f"store mode must be 'resident' or 'mmap', got {mode!r}")
        if (
            isinstance(window_exchanges, bool)
            or not isinstance(window_exchanges, int)
            or window_exchanges < 1
        ):
            raise EdgeError(f"window_exchanges must be a positive integer, got {window_exchanges!r}")
        self.path, self.spec, self.groups = Path(path), spec, groups
        self.budget_request = parse_budget(budget) if budget is not None else None
        self.shares = shares or {}
        self.pin_groups, self.window_exchanges = pin, window_exchanges
        self._defs = {g.key: g for layer in groups for part in layer for g in part}
        try:
            probe = _store.Store(str(path), None, mode, False, False)
        except (ValueError, RuntimeError) as exc:
            raise EdgeError(str(exc)) from None
        try:
            self._check(probe, model_fingerprint)
            self.sizes: dict[Key, int] = {tuple(e[0]): int(e[3]) for e in probe.groups()}
        finally:
            probe.close()
        self.total_bytes = sum(self.sizes[k] for k in self._defs)
        self.budget = self._budget_bytes(self._defs)
        try:
            self._store = _store.Store(
                str(path),
                self.budget,
                mode,
                prefetch,
                drop_page_cache,
                "auto",
                loader_threads,
                read_bandwidth,
            )
        except (ValueError, RuntimeError) as exc:
            raise EdgeError(str(exc)) from None
        self.mode = mode
        self._held: set[Key] = set(self._defs)
        if held is not None:  # a worker holds nothing until it is assigned groups
            self._held = {tuple(k) for k in held}
            self._store.set_held(sorted(self._held))
        self.generation = 0  # bumped by hold(): the held set changed
        self.pinned: list[Key] = []

    def _check(self, probe: Any, model_fingerprint: str | None) -> None:
        try:
            meta = json.loads(probe.meta)
        except ValueError:
            raise EdgeError(f"{self.path}: the store's meta is not JSON") from None
        if meta.get("format") != STORE_FORMAT:
            raise EdgeError(f"{self.path}: not a halo edge group store (format {meta.get('format')!r})")
        if model_fingerprint is not None and meta.get("fingerprint") != model_fingerprint:
            raise EdgeError(f"{self.path}: made for another model (fingerprint {meta.get('fingerprint')})")
        want = {"family": self.spec.family, "layers": self.spec.layers, "hidden": self.spec.hidden}
        for name, value in want.items():
            if meta.get(name) != value:
                raise EdgeError(f"{self.path}: store {name} {meta.get(name)!r}, the model's is {value!r}")
        ffn = self.groups[0][FFN]
        if ffn and meta.get("group_size") != ffn[0].stop - ffn[0].start:
            raise EdgeError(
                f"{self.path}: store groups of {meta.get('group_size')} neurons, the plan's are "
                f"{ffn[0].stop - ffn[0].start}"
            )
        attn = self.groups[0][ATTN]
        if attn and meta.get("heads_per_group") != len(attn[0].heads):
            raise EdgeError(
                f"{self.path}: store groups of {meta.get('heads_per_group')} heads, the plan's are "
                f"{len(attn[0].heads)}"
            )
        present = {tuple(e[0]) for e in probe.groups()}
        missing = [k for k in self._defs if k not in present]
        if missing:
            raise EdgeError(f"{self.path}: the store lacks group {missing[0]} (and {len(missing) - 1} more)")

    def _budget_bytes(self, keys: Iterable[Key]) -> int | None:
        b = self.budget_request
        if b is None:
            return None
        held = [self.sizes[k] for k in keys]
        if isinstance(b, float):
            return max(int(b * sum(held)), max(held, default=1))
        return int(b)

    # -- WeightStore's interface -----------------------------------------------------------
    def hold(self, groups: Iterable[GroupDef]) -> tuple[int, int]:
        """Makes ``groups`` this store's share: sets their static importance, fits the budget
        to them (a fractional budget), and pins the most important ones (see the class)."""
        defs = list(groups)
        wanted = {g.key for g in defs}
        added, dropped = len(wanted - self._held), len(self._held - wanted)
        self._held = wanted
        keys = sorted(wanted)
        self.generation += 1
        try:
            self._store.unpin_all()
            self._store.set_held(keys)
            if isinstance(self.budget_request, float) and keys:
                self.budget = self._budget_bytes(keys)
                self._store.set_budget(self.budget)
            self._store.set_importance(keys, [self.shares.get(k, 1.0) for k in keys])
            self.pinned = self._pinned(defs)
            if self.pinned:
                failed = set(self.pin(self.pinned))
                self.pinned = [k for k in self.pinned if k not in failed]
        except (ValueError, RuntimeError) as exc:
            raise EdgeError(str(exc)) from None
        return added, dropped

    def _pinned(self, defs: list[GroupDef]) -> list[Key]:
        held_bytes = sum(self.sizes[g.key] for g in defs)
        if self.budget is None or self.budget >= held_bytes:
            return sorted(g.key for g in defs) if self.mode == "resident" else []
        if not self.pin_groups or self.mode != "resident":
            return []
        per_exchange: dict[tuple[int, int], int] = {}
        for g in defs:
            per_exchange[(g.layer, g.part)] = per_exchange.get((g.layer, g.part), 0) + self.sizes[g.key]
        window = min(self.budget, self.window_exchanges * max(per_exchange.values(), default=0))
        room = self.budget - window
        ranked = sorted(defs, key=lambda g: (-self.shares.get(g.key, 1.0) / self.sizes[g.key], g.key))
        out = []
        for g in ranked:
            if self.sizes[g.key] <= room:
                out.append(g.key)
                room -= self.sizes[g.key]
        return sorted(out)

    def get(self, key: Key) -> GroupWeights:
        import torch

        g = self._defs[key]
        mats: dict[str, Any] = {}
        for name, _rows, _cols, weight in _tensors_of(self.spec, g):
            if weight:
                mats[name] = Q4Linear(self._store, key, name)
            else:
                mats[name] = torch.from_numpy(self._store.read_tensor(key, name)).reshape(-1)
        return GroupWeights(mats)

    def keys(self) -> list[Key]:
        return sorted(self._held)

    # -- the loader's controls ---------------------------------------------------------------
    @property
    def held(self) -> set[Key]:
        return set(self._held)

    def held_bytes(self) -> int:
        return sum(self.sizes[k] for k in self._held)

    def set_importance(self, keys: Sequence[Key], values: Sequence[float]) -> None:
        self._store.set_importance(list(keys), [float(v) for v in values])

    def pin(self, keys: Sequence[Key]) -> list[Key]:
        return [tuple(k) for k in self._store.pin(list(keys))]

    def unpin_all(self) -> None:
        self._store.unpin_all()

    def advance(self, layer: int, part: int) -> None:
        self._store.advance(layer, part)

    def acquire(self, keys: Sequence[Key]) -> list[bool]:
        return self._store.acquire(list(keys))

    def load_now(self, key: Key) -> bool:
        return self._store.load_now(key)

    def release(self, keys: Sequence[Key]) -> None:
        self._store.release(list(keys))

    def stats(self) -> dict[str, Any]:
        """Counters (loads, reads, peak resident bytes...); after close(), those at close."""
        closed = getattr(self, "_closed_stats", None)
        return dict(closed) if closed is not None else self._store.stats()

    def errors(self) -> list[tuple[Key, str]]:
        return [(tuple(k), why) for k, why in self._store.errors()]

    def resident(self) -> list[Key]:
        return [tuple(k) for k in self._store.resident()]

    def wait_idle(self, timeout: float = 30.0) -> bool:
        return self._store.wait_idle(timeout)

    def read_tensor(self, key: Key, name: str) -> np.ndarray:
        return self._store.read_tensor(key, name)

    def tensor_bytes(self, key: Key, name: str) -> bytes:
        return self._store.tensor_bytes(key, name)

    def close(self) -> None:
        if getattr(self, "_closed_stats", None) is None:
            self._closed_stats = self._store.stats()
        self._store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Compute on whatever is resident at the deadline


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

    predictors: {(layer, part): edge_plan.PartPredictor} (look-ahead scores; None: static only)
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
        """Every plan must be for one of the worker's models ({fingerprint: edge_worker.Served})."""
        from .plan import check_plan_shape

        for plan in self.plans:
            served = models.get(plan.fingerprint)
            if served is None:
                raise EdgeError(f"{plan.path}: the plan is for a model this worker does not serve")
            check_plan_shape(plan, served.spec, str(plan.path))

    def open(
        self, model: str, spec: Spec, groups, model_fingerprint: str, wait_all: bool
    ) -> tuple[GroupStore, StreamedCompute]:
        from .plan import load_predictors

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
        from .plan import Plan, load_plan, load_predictors

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
            meta = json.loads(_peek_meta(store_path))
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


def _peek_meta(path: str | os.PathLike) -> str:
    try:
        probe = _store.Store(str(path), None, "resident", False, False)
    except (ValueError, RuntimeError) as exc:
        raise EdgeError(str(exc)) from None
    try:
        return probe.meta
    finally:
        probe.close()


def budget_text(size: int | None) -> str:
    if size is None:
        return "unlimited"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


__all__ = [
    "MODES",
    "GroupStore",
    "Q4Linear",
    "StreamedCompute",
    "StreamedLocal",
    "budget_text",
    "build_store",
    "default_store_path",
    "ensure_store",
    "input_norms",
    "parse_budget",
    "static_shares",
]
