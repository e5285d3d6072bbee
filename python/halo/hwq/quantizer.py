"""HALO hardware-aware quantization (arXiv 2502.19662).

``halo_quantize`` splits a weight matrix (rows = output channels) into a
full-precision CSR part (salient weights and k-sigma outliers) and a dense
part cut into tiles. In the default INT8-subset mode (the paper's setting) a
tile's code book is a small set of INT8 values (at most ``book_size`` per
operating point, e.g. 16 at 2.4 GHz and 9 at 3.7 GHz) chosen, per layer and
point, from the values whose multiply fits that point's clock under a
:class:`HardwareModel`. The most sensitive tiles (mean sensitivity, e.g.
Fisher g^2, split by cumulative share) stay at the nominal clock, the rest run
faster (``mode="performance"``) or at a lower voltage (``mode="energy"``). The
result carries the DVFS plan and a latency/energy estimate against uniform,
W8A8 and FP16 baselines at the nominal point. ``rtn_quantize`` is the plain
round-to-nearest baseline.

    >>> import halo, numpy as np
    >>> w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    >>> q = halo.halo_quantize(w, tile=(64, 64))
    >>> err = float(np.abs(q.dequantize() - w).mean())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core
from .._arrays import flatten_float, is_torch_tensor
from ..backend import check_backend
from .hardware import HardwareModel, check_choice, check_int

_hw = _core.hwq

GRIDS = ("subset", "int4", "int8")
MODES = ("performance", "energy")
PRESETS = ("performance", "balanced", "accuracy")
ASSIGNS = ("sensitivity", "error_gain")
BASELINES = ("uniform", "w8a8", "fp16")


def as_float32_matrix(function: str, value: Any, what: str = "w") -> np.ndarray:
    """A C-contiguous float32 2-D copy/view of a NumPy array or torch tensor."""
    flat = flatten_float(function, value)
    if len(flat.shape) != 2:
        raise ValueError(
            f"[{function}] {what} must be 2-D (out_features, in_features), got shape {flat.shape}"
        )
    if flat.dtype == "bfloat16":
        data = (flat.data.astype(np.uint32) << 16).view(np.float32)
    else:
        data = flat.data.astype(np.float32, copy=False)
    return np.ascontiguousarray(data.reshape(flat.shape))


def check_tile(function: str, tile: Any) -> tuple[int, int]:
    """(rows, cols) of positive ints, or ValueError naming the function and the value."""
    try:
        rows, cols = (int(v) for v in tile)
    except (TypeError, ValueError):
        raise ValueError(f"[{function}] tile must be a pair (rows, cols), got {tile!r}") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"[{function}] tile sizes must be positive, got {tuple(tile)!r}")
    return rows, cols


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class Tile:
    """One weight tile: where it is, its code book and the point it runs at."""

    index: int
    row: int
    col: int
    shape: tuple[int, int]
    code_book: tuple[int, ...]
    scale: np.ndarray  # per row of the tile (all equal with channel_scales=False)
    point: int
    frequency_ghz: float
    voltage: float
    wanted_point: (
        int  # the most aggressive point its sensitivity allowed (the plan may keep it nearer nominal)
    )
    error: float  # sensitivity-weighted squared error of its dense part
    score: float  # mean sensitivity (e.g. Fisher g^2)


@dataclass(frozen=True)
class SparsePart:
    """Full-precision salient/outlier weights, CSR over output channels (rows)."""

    shape: tuple[int, int]
    indptr: np.ndarray  # int64 (rows + 1)
    indices: np.ndarray  # int32 column per kept weight
    values: np.ndarray  # float32: the original weights (rounded to float16 with sparse_dtype="float16")

    @property
    def nnz(self) -> int:
        return int(self.values.size)

    def to_dense(self) -> np.ndarray:
        dense = np.zeros(self.shape, np.float32)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        dense[rows, self.indices] = self.values
        return dense


@dataclass(frozen=True)
class Plan:
    """The DVFS schedule: tiles in execution order and the point each runs at."""

    order: np.ndarray  # tile indices (row-major numbering) in execution order
    point: np.ndarray  # per tile (row-major numbering): model point
    switches: int
    frequencies_ghz: tuple[float, ...]  # of each operating point
    voltages: tuple[float, ...]

    def segments(self) -> list[tuple[float, float, int]]:
        """(voltage, frequency_ghz, tile count) for each constant-point stretch in execution order."""
        result: list[tuple[float, float, int]] = []
        previous = None
        for tile in self.order:
            p = int(self.point[tile])
            if result and previous == p:
                result[-1] = (result[-1][0], result[-1][1], result[-1][2] + 1)
            else:
                result.append((self.voltages[p], self.frequencies_ghz[p], 1))
            previous = p
        return result


@dataclass(frozen=True)
class Cost:
    """One way of running a layer: latency = max(compute, memory); energy = dynamic + leakage + memory + static."""

    latency_ns: float
    energy_nj: float
    compute_ns: float
    memory_ns: float
    dynamic_nj: float
    leakage_nj: float
    memory_nj: float
    static_nj: float
    bits: float  # stored bits per weight


@dataclass(frozen=True)
class Estimate:
    """HALO's cost and the baselines' at the nominal point: ``uniform`` (HALO's code bits), ``w8a8``, ``fp16``."""

    halo: Cost
    baselines: dict[str, Cost]
    switch_ns: float
    switch_nj: float
    sparse_ns: float  # sparse engine time (concurrent with the dense array)
    sparse_nj: float
    sparse_point: int
    nominal_point: int
    tokens: int

    def speedup_vs(self, baseline: str = "uniform") -> float:
        return self.baselines[check_choice("Estimate", "baseline", baseline, BASELINES)].latency_ns / (
            self.halo.latency_ns
        )

    def energy_saving_vs(self, baseline: str = "uniform") -> float:
        base = self.baselines[check_choice("Estimate", "baseline", baseline, BASELINES)].energy_nj
        return 1.0 - self.halo.energy_nj / base

    # The library's historical headline: against the uniform baseline.
    @property
    def latency_ns(self) -> float:
        return self.halo.latency_ns

    @property
    def energy_nj(self) -> float:
        return self.halo.energy_nj

    @property
    def baseline_latency_ns(self) -> float:
        return self.baselines["uniform"].latency_ns

    @property
    def baseline_energy_nj(self) -> float:
        return self.baselines["uniform"].energy_nj

    @property
    def speedup(self) -> float:
        return self.speedup_vs("uniform")

    @property
    def energy_saving(self) -> float:
        return self.energy_saving_vs("uniform")

    @property
    def average_bits(self) -> float:
        return self.halo.bits

    @property
    def baseline_bits(self) -> float:
        return self.baselines["uniform"].bits

    def as_dict(self) -> dict:
        return {
            "halo": dict(self.halo.__dict__),
            "baselines": {k: dict(v.__dict__) for k, v in self.baselines.items()},
            "switch_ns": self.switch_ns,
            "switch_nj": self.switch_nj,
            "sparse_ns": self.sparse_ns,
            "sparse_nj": self.sparse_nj,
            "sparse_point": self.sparse_point,
            "nominal_point": self.nominal_point,
            "tokens": self.tokens,
            "speedup": {b: self.speedup_vs(b) for b in BASELINES},
            "energy_saving": {b: self.energy_saving_vs(b) for b in BASELINES},
        }

    @classmethod
    def _from_raw(cls, raw: dict) -> Estimate:
        return cls(
            Cost(**raw["halo"]),
            {name: Cost(**raw[name]) for name in BASELINES},
            raw["switch_ns"],
            raw["switch_nj"],
            raw["sparse_ns"],
            raw["sparse_nj"],
            int(raw["sparse_point"]),
            int(raw["nominal_point"]),
            int(raw["tokens"]),
        )


class HaloQuantized:
    """A HALO-quantized matrix: grid codes, row-in-tile scales, per-rung books, CSR side part, DVFS plan.

    Holds the C++ result; the arrays are read-only views of it.
    """

    def __init__(self, handle: Any, hw: HardwareModel, kind: str):
        self._q = handle
        self.hw = hw
        self._kind = kind
        self.codes: np.ndarray = _readonly(handle.codes)
        self.scales: np.ndarray = _readonly(handle.scales)
        self.shape: tuple[int, int] = tuple(handle.shape)
        self.tile_shape: tuple[int, int] = tuple(handle.tile_shape)
        self.bits: int = handle.bits  # MAC grid: codes are values of the signed `bits` grid
        self.grid_mode: str = handle.grid
        self.sparse_dtype: str = handle.sparse_dtype
        self.mode: str = handle.mode
        self.ladder: tuple[int, ...] = tuple(handle.ladder)
        self.books: tuple[tuple[int, ...], ...] = tuple(tuple(b) for b in handle.books)
        self.sparse = SparsePart(
            self.shape, _readonly(handle.indptr), _readonly(handle.indices), _readonly(handle.values)
        )
        points = hw.operating_points
        self.plan = Plan(
            _readonly(handle.plan_order),
            _readonly(handle.plan_point),
            int(handle.switches),
            tuple(p["frequency_ghz"] for p in points),
            tuple(p["voltage"] for p in points),
        )
        self.wanted_point: np.ndarray = _readonly(handle.wanted_point)
        self.tile_error: np.ndarray = _readonly(handle.tile_error)
        self.tile_score: np.ndarray = _readonly(handle.tile_score)
        self._estimates: dict[int, Estimate] = {}

    @property
    def grid(self) -> tuple[int, int]:
        (rows, cols), (tr, tc) = self.shape, self.tile_shape
        return (-(-rows // tr), -(-cols // tc))

    @property
    def stored_bits(self) -> float:
        """Bits per weight of the packed layout (code indices, book tables, fp32 scales, CSR part)."""
        return float(_hw.stored_bits(self._q))

    def book_of(self, point: int) -> tuple[int, ...]:
        """The code book tiles running at model point ``point`` use."""
        if point not in self.ladder:
            raise ValueError(
                f"[HaloQuantized.book_of] point {point!r} is not on this run's ladder {self.ladder}"
            )
        return self.books[self.ladder.index(point)]

    @property
    def tiles(self) -> list[Tile]:
        points = self.hw.operating_points
        (tr, tc), (_, gcols) = self.tile_shape, self.grid
        result = []
        for index, point in enumerate(self.plan.point):
            point = int(point)
            r0, c0 = (index // gcols) * tr, (index % gcols) * tc
            height, width = min(tr, self.shape[0] - r0), min(tc, self.shape[1] - c0)
            result.append(
                Tile(
                    index,
                    r0,
                    c0,
                    (height, width),
                    self.book_of(point),
                    self.scales[r0 : r0 + height, index % gcols].copy(),
                    point,
                    points[point]["frequency_ghz"],
                    points[point]["voltage"],
                    int(self.wanted_point[index]),
                    float(self.tile_error[index]),
                    float(self.tile_score[index]),
                )
            )
        return result

    def estimate(self, tokens: int | None = None) -> Estimate:
        """Latency/energy/bits of HALO and the uniform, W8A8 and FP16 baselines at the nominal point, for
        ``tokens`` input columns per pass (default: those the plan was made for)."""
        count = 0 if tokens is None else check_int("HaloQuantized.estimate", "tokens", tokens)
        if tokens is not None and count < 1:
            raise ValueError(f"[HaloQuantized.estimate] tokens must be >= 1, got {tokens!r}")
        if count not in self._estimates:
            self._estimates[count] = Estimate._from_raw(_hw.estimate(self._q, self.hw._model, count))
        return self._estimates[count]

    def dequantize(self) -> Any:
        """The float32 reconstruction (a torch tensor when a tensor was quantized)."""
        out = _hw.dequantize(self._q)
        if self._kind == "torch":
            import torch

            return torch.from_numpy(out)
        return out


def _resolve_grid(function: str, grid: Any, bits: Any) -> str:
    if bits is None:
        return "subset" if grid is None else check_choice(function, "grid", grid, GRIDS)
    by_bits = {4: "int4", 8: "int8"}.get(bits) if not isinstance(bits, bool) else None
    if by_bits is None:
        raise ValueError(f"[{function}] bits must be 4 or 8 (the int4 / int8 grid modes), got {bits!r}")
    if grid is not None and grid != by_bits:
        raise ValueError(f"[{function}] bits={bits} selects grid {by_bits!r} but grid={grid!r} was given")
    return by_bits


def halo_quantize(
    w: Any,
    sensitivity: Any = None,
    hw: HardwareModel | None = None,
    tile: Sequence[int] = (128, 128),
    salient_fraction: float = 5e-4,
    outlier_sigma: float = 3.0,
    max_switches: int = 3,
    *,
    grid: str | None = None,
    bits: int | None = None,
    sparse_dtype: str = "float16",
    mode: str = "performance",
    preset: str = "balanced",
    assign: str | None = None,
    split: Sequence[float] | None = None,
    tier_fractions: Sequence[float] | None = None,
    channel_scales: bool = True,
    book_iterations: int = 4,
    energy_weight: float = 0.1,
    tokens: int = 128,
    backend: str = "auto",
) -> HaloQuantized:
    """Quantizes a 2-D weight matrix with HALO.

    sensitivity: per-weight importance of the same shape (squared gradients for Fisher, or the input
    activations' mean square broadcast over rows); None uses |w|. sparse_dtype: how the full-precision
    side part stores its values (``"float16"``, as the paper's FP16 models; ``"float32"``: exactly).
    grid: ``"subset"`` (default: INT8 MAC, books of at most each point's ``book_size`` admitted INT8 values),
    ``"int4"`` (a 4-bit MAC, books = admitted 4-bit values) or ``"int8"`` (books = admitted INT8 values);
    ``bits=4`` / ``bits=8`` select the last two.
    mode: ``"performance"`` (faster clocks) or ``"energy"`` (lower voltage at the nominal clock).
    assign: ``"sensitivity"`` (default: mean-sensitivity tile score, cumulative split by ``preset`` —
    performance, balanced, accuracy — or explicit ``split`` thresholds, one per rung but the last) or
    ``"error_gain"`` (tiles losing least on the small books go fast; ``tier_fractions``: share of tiles per
    rung; giving tier_fractions selects this). channel_scales: a scale per row inside each tile (else one
    per tile). book_iterations: rounds of book search and scale fit per point (subset mode).
    energy_weight: how much switching activity a subset book pays for relative to its error (0: error
    only; 0.1: halving its MAC energy is worth 5 % more weighted error). tokens: input columns per pass
    assumed by the plan and the estimate. backend: the
    scale-search kernel (``"auto"`` follows HALO_BACKEND / the CPU; ``"scalar"``, ``"avx2"``, ``"avx512"``).
    """
    fn = "halo_quantize"
    matrix = as_float32_matrix(fn, w)
    sens = None
    if sensitivity is not None:
        sens = as_float32_matrix(fn, sensitivity, "sensitivity")
        if sens.shape != matrix.shape:
            raise ValueError(
                f"[{fn}] sensitivity shape {sens.shape} differs from the weights' {matrix.shape}"
            )
    hw = HardwareModel.default() if hw is None else hw
    if not isinstance(hw, HardwareModel):
        raise TypeError(f"[{fn}] hw must be a HardwareModel, got {type(hw).__name__}")
    tile_rows, tile_cols = check_tile(fn, tile)
    for name, value in (
        ("max_switches", max_switches),
        ("tokens", tokens),
        ("book_iterations", book_iterations),
    ):
        check_int(fn, name, value)
    grid_mode = _resolve_grid(fn, grid, bits)
    if assign is None:
        assign = "error_gain" if tier_fractions is not None else "sensitivity"
    raw = _hw.quantize(
        matrix,
        sens,
        hw._model,
        grid_mode,
        check_choice(fn, "mode", mode, MODES),
        check_choice(fn, "assign", assign, ASSIGNS),
        check_choice(fn, "preset", preset, PRESETS),
        [] if split is None else [float(f) for f in split],
        [] if tier_fractions is None else [float(f) for f in tier_fractions],
        tile_rows,
        tile_cols,
        float(salient_fraction),
        float(outlier_sigma),
        check_choice(fn, "sparse_dtype", sparse_dtype, ("float16", "float32")),
        int(max_switches),
        bool(channel_scales),
        int(book_iterations),
        float(energy_weight),
        int(tokens),
        check_backend(fn, backend),
    )
    return HaloQuantized(raw, hw, "torch" if is_torch_tensor(w) else "numpy")


class RtnQuantized:
    """Symmetric round-to-nearest: codes in [-2^(b-1), 2^(b-1)-1], absmax scale per row group."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray, bits: int, group_size: int, kind: str):
        self.codes, self.scales, self.bits, self.group_size, self._kind = (
            codes,
            scales,
            bits,
            group_size,
            kind,
        )

    @property
    def average_bits(self) -> float:
        return self.bits + 32.0 * self.scales.size / self.codes.size

    def dequantize(self) -> Any:
        columns = np.arange(self.codes.shape[1]) // self.group_size
        out = self.codes.astype(np.float32) * self.scales[:, columns]
        if self._kind == "torch":
            import torch

            return torch.from_numpy(out)
        return out


def rtn_quantize(w: Any, bits: int = 4, group_size: int = 128) -> RtnQuantized:
    """Round-to-nearest baseline with one fp32 absmax scale per ``group_size`` weights of a row (<= 0: whole row)."""
    fn = "rtn_quantize"
    matrix = as_float32_matrix(fn, w)
    group_size = check_int(fn, "group_size", group_size)
    bits = check_int(fn, "bits", bits)
    if not np.isfinite(matrix).all():
        raise ValueError(f"[{fn}] w holds non-finite values")
    codes, scales = _hw.rtn_quantize(matrix, bits, group_size)
    group = matrix.shape[1] if group_size <= 0 else min(group_size, matrix.shape[1])
    return RtnQuantized(codes, scales, bits, group, "torch" if is_torch_tensor(w) else "numpy")


def weighted_error(w: Any, w_hat: Any, sensitivity: Any = None) -> float:
    """sum s (w - w_hat)^2 / sum s w^2 (s = |w| when no sensitivity is given)."""
    a = as_float32_matrix("weighted_error", w).astype(np.float64)
    b = as_float32_matrix("weighted_error", w_hat, "w_hat").astype(np.float64)
    s = np.abs(a) if sensitivity is None else as_float32_matrix("weighted_error", sensitivity, "sensitivity")
    if a.shape != b.shape or s.shape != a.shape:
        raise ValueError(f"[weighted_error] shapes differ: {a.shape}, {b.shape}, {s.shape}")
    return float((s * (a - b) ** 2).sum() / max((s * a * a).sum(), 1e-300))
