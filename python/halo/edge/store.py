"""Devices smaller than their share: neuron-group weights streamed from a local 4-bit store.

HALO's second mechanism (arXiv 2601.11676): a device that cannot hold all the weights of
its groups keeps them on local disk and loads the ones it will need next while it
computes. Here:

* ``build_store`` writes every group of a model (``model.layout``) to one file in
  halo's 4-bit layout (NF4 via ``halo.quantize_4bit``; biases as float32), with a
  versioned, checksummed header and index (``halo._core.edge_store``; format in
  include/halo/edge/group_store.hpp).
* ``GroupStore`` keeps at most a memory budget of groups resident. Loader threads (C++)
  read, while the current exchange computes, the groups needed soonest and, within an
  exchange, the most important per byte first (importance: the semantic predictor's score
  for the next exchange, static importance otherwise). Eviction takes the groups needed
  latest (the ones just used: recency), then the least important. The most important
  groups are pinned first; see docs/partition.md.
* :mod:`halo.edge.streaming` computes on whatever is resident at each exchange's deadline.

Modes: ``predict`` (loader + predictor; missing groups compensated with zero by default, with
the plan's estimate on request), ``static`` (loader with
static importance only), ``demand`` (no loader: a missing group is read synchronously, the
load-on-demand baseline), ``mmap`` (the whole file mapped, the kernel pages it in, page
cache capped at the budget: the llama.cpp ``--mmap`` baseline) and ``resident`` (every
group loaded first: the all-resident reference).

Long module: the store's file format and its budgeted reader are one unit: ``GroupStore``
checks exactly what ``build_store`` writes.
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
from .._moved import moved_names
from .compute import GroupWeights, WeightStore
from .model import (
    ATTN,
    FFN,
    Checkpoint,
    EdgeError,
    GroupDef,
    Spec,
    default_heads_per_group,
    fingerprint,
    layout,
    read_spec,
)

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
    return json.loads(peek_meta(path)).get("format") == STORE_FORMAT


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
    ``halo.edge.compute.WeightStore`` (so ``GroupCompute`` and the edge worker run on it), plus the
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


def peek_meta(path: str | os.PathLike) -> str:
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


# names that moved to halo.edge.streaming when this module was split
__getattr__ = moved_names(
    __name__,
    "halo.edge.streaming",
    ("StreamedCompute", "StreamedLocal", "WorkerStreaming", "input_norms", "static_shares"),
)

__all__ = [
    "MODES",
    "GroupStore",
    "Q4Linear",
    "budget_text",
    "build_store",
    "default_store_path",
    "ensure_store",
    "parse_budget",
    "peek_meta",
]
