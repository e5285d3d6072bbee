"""HALO hardware-aware quantization (arXiv 2502.19662).

``halo_quantize`` splits a weight matrix (rows = output channels) into a
full-precision CSR part (salient weights and k-sigma outliers) and a dense
low-bit part cut into tiles. Each tile uses the code book its clock admits
under a :class:`HardwareModel` (values whose multiplier critical path fits the
clock period); tiles that lose least from the small code book run at the
fastest clock. The result carries the DVFS plan and a latency/energy estimate
against a uniform quantizer at the nominal point. ``rtn_quantize`` is the
plain round-to-nearest baseline.

    >>> import halo, numpy as np
    >>> w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    >>> q = halo.halo_quantize(w, tile=(64, 64))
    >>> err = float(np.abs(q.dequantize() - w).mean())
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from ._arrays import flatten_float, is_torch_tensor
from .backend import check_backend

_hw = _core.hwq


class HardwareModel:
    """Per-value multiply delays (4- and 8-bit grids), DVFS points, switch cost, array and tile shape.

    Held as validated JSON (schema in docs/hwq.md); ``load``/``save`` read and write it.
    """

    def __init__(self, text: str | None = None):
        self._text = (
            _hw.default_model() if text is None else _hw.normalize_model(_check_str("HardwareModel", text))
        )
        self._data = json.loads(self._text)

    @classmethod
    def default(cls) -> HardwareModel:
        return cls()

    @classmethod
    def from_json(cls, text: str) -> HardwareModel:
        return cls(text)

    @classmethod
    def from_dict(cls, data: dict) -> HardwareModel:
        return cls(json.dumps(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> HardwareModel:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as error:
            raise ValueError(f"[HardwareModel.load] cannot read {str(path)!r}: {error.strerror}") from error
        return cls(text)

    def to_json(self) -> str:
        return self._text

    def to_dict(self) -> dict:
        return json.loads(self._text)

    def save(self, path: str | os.PathLike) -> None:
        _atomic_write_text(path, self._text + "\n")

    @property
    def operating_points(self) -> list[dict]:
        return [dict(p) for p in self._data["operating_points"]]

    def delays(self, bits: int = 4) -> dict[int, float]:
        table = self._data["delay_ns"][_grid_key("HardwareModel.delays", bits)]
        low = -(1 << (bits - 1))
        return {low + i: float(d) for i, d in enumerate(table)}

    def code_book(self, point: int, bits: int = 4) -> tuple[int, ...]:
        """Values of the signed ``bits`` grid admitted at operating point ``point`` (ascending frequency order)."""
        return tuple(_hw.code_book(self._text, bits, point))

    def nominal_point(self, bits: int = 4) -> int:
        """The fastest point admitting the whole grid (where a uniform quantizer runs); -1 if none."""
        return int(_hw.nominal_point(self._text, bits))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HardwareModel) and self._data == other._data

    def __repr__(self) -> str:
        points = ", ".join(
            f"({p['voltage']} V, {p['frequency_ghz']} GHz)" for p in self._data["operating_points"]
        )
        return f"HardwareModel(points=[{points}], tile={self._data['tile']})"


def _grid_key(function: str, bits: int) -> str:
    if bits not in (4, 8):
        raise ValueError(f"[{function}] bits must be 4 or 8, got {bits!r}")
    return f"int{bits}"


def _check_str(function: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"[{function}] expected JSON text, got {type(value).__name__}")
    return value


def _atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


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


def _tile_pair(function: str, tile: Any) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in tile)
    except (TypeError, ValueError):
        raise ValueError(f"[{function}] tile must be a pair (rows, cols), got {tile!r}") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"[{function}] tile sizes must be positive, got {tile!r}")
    return rows, cols


@dataclass(frozen=True)
class Tile:
    """One weight tile: where it is, its code book and the clock it runs at."""

    index: int
    row: int
    col: int
    shape: tuple[int, int]
    code_book: tuple[int, ...]
    scale: np.ndarray  # per row of the tile (all equal with channel_scales=False)
    point: int
    frequency_ghz: float
    voltage: float
    wanted_point: int  # the fastest point its sensitivity allowed (the plan may run it slower)
    error: float  # sensitivity-weighted squared error of its dense part


@dataclass(frozen=True)
class SparsePart:
    """Full-precision salient/outlier weights, CSR over output channels (rows)."""

    shape: tuple[int, int]
    indptr: np.ndarray  # int64 (rows + 1)
    indices: np.ndarray  # int32 column per kept weight
    values: np.ndarray  # float32 original weights

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
    point: np.ndarray  # per tile (row-major numbering)
    switches: int
    frequencies_ghz: tuple[float, ...]  # of each operating point
    voltages: tuple[float, ...]

    def segments(self) -> list[tuple[float, float, int]]:
        """(voltage, frequency_ghz, tile count) for each constant-clock stretch in execution order."""
        result: list[tuple[float, float, int]] = []
        for tile in self.order:
            p = int(self.point[tile])
            if result and result[-1][1] == self.frequencies_ghz[p]:
                result[-1] = (result[-1][0], result[-1][1], result[-1][2] + 1)
            else:
                result.append((self.voltages[p], self.frequencies_ghz[p], 1))
        return result


@dataclass(frozen=True)
class Estimate:
    latency_ns: float
    energy_nj: float
    baseline_latency_ns: float
    baseline_energy_nj: float
    speedup: float
    energy_saving: float
    average_bits: float
    baseline_bits: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class HaloQuantized:
    """A HALO-quantized matrix: int codes on the tier grids, row-in-tile scales, CSR side part, DVFS plan."""

    def __init__(
        self, raw: dict, hw: HardwareModel, bits: int, shape: tuple[int, int], kind: str, dtype: str
    ):
        self.codes: np.ndarray = raw["codes"]
        self.scales: np.ndarray = raw["scales"]
        self.tile_shape = (int(raw["tile_rows"]), int(raw["tile_cols"]))
        self.bits = bits
        self.shape = shape
        self.hw = hw
        self._kind, self._dtype = kind, dtype
        self.sparse = SparsePart(shape, raw["indptr"], raw["indices"], raw["values"])
        points = hw.operating_points
        self.plan = Plan(
            np.asarray(raw["plan_order"], np.int64),
            np.asarray(raw["plan_point"], np.int64),
            int(raw["switches"]),
            tuple(p["frequency_ghz"] for p in points),
            tuple(p["voltage"] for p in points),
        )
        self.wanted_point = np.asarray(raw["wanted_point"], np.int64)
        self.tile_error = np.asarray(raw["tile_error"], np.float64)
        self._estimate = Estimate(**raw["estimate"])

    @property
    def grid(self) -> tuple[int, int]:
        (rows, cols), (tr, tc) = self.shape, self.tile_shape
        return (-(-rows // tr), -(-cols // tc))

    @property
    def tiles(self) -> list[Tile]:
        points = self.hw.operating_points
        books = [self.hw.code_book(p, self.bits) for p in range(len(points))]
        (tr, tc), (_, gcols) = self.tile_shape, self.grid
        result = []
        for index, point in enumerate(self.plan.point):
            r0, c0 = (index // gcols) * tr, (index % gcols) * tc
            height, width = min(tr, self.shape[0] - r0), min(tc, self.shape[1] - c0)
            result.append(
                Tile(
                    index,
                    r0,
                    c0,
                    (height, width),
                    books[point],
                    self.scales[r0 : r0 + height, index % gcols].copy(),
                    int(point),
                    points[point]["frequency_ghz"],
                    points[point]["voltage"],
                    int(self.wanted_point[index]),
                    float(self.tile_error[index]),
                )
            )
        return result

    def estimate(self) -> Estimate:
        """Latency/energy against a uniform quantizer at the nominal point, and stored bits per weight."""
        return self._estimate

    def dequantize(self) -> Any:
        """The float32 reconstruction (a torch tensor when a tensor was quantized)."""
        out = _hw.dequantize(
            self.codes,
            self.scales,
            self.tile_shape[1],
            self.sparse.indptr,
            self.sparse.indices,
            self.sparse.values,
        )
        if self._kind == "torch":
            import torch

            return torch.from_numpy(out)
        return out


def halo_quantize(
    w: Any,
    sensitivity: Any = None,
    hw: HardwareModel | None = None,
    tile: Sequence[int] = (128, 128),
    salient_fraction: float = 5e-4,
    outlier_sigma: float = 3.0,
    max_switches: int = 3,
    *,
    bits: int = 4,
    channel_scales: bool = True,
    tier_fractions: Sequence[float] | None = None,
    tokens: int = 128,
    backend: str = "auto",
) -> HaloQuantized:
    """Quantizes a 2-D weight matrix with HALO.

    sensitivity: per-weight importance of the same shape (e.g. squared gradients, or the input
    activations' mean square broadcast over rows); None uses |w|. tier_fractions: share of tiles
    wanting each operating point (ascending frequency); None gives a quarter the fastest point and
    the rest the next one. channel_scales: a scale per row inside each tile (else one per tile).
    tokens: input columns per pass assumed by the plan and the estimate. backend: the scale-search
    kernel ("auto" follows HALO_BACKEND / the CPU; "avx512" or "scalar"; "avx2" runs the scalar loop).
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
    tile_rows, tile_cols = _tile_pair(fn, tile)
    for name, value in (("max_switches", max_switches), ("bits", bits), ("tokens", tokens)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"[{fn}] {name} must be an int, got {value!r}")
    fractions = [] if tier_fractions is None else [float(f) for f in tier_fractions]
    raw = _hw.quantize(
        matrix,
        sens,
        hw.to_json(),
        int(bits),
        tile_rows,
        tile_cols,
        float(salient_fraction),
        float(outlier_sigma),
        int(max_switches),
        bool(channel_scales),
        fractions,
        int(tokens),
        check_backend(fn, backend),
    )
    flat_kind = "torch" if is_torch_tensor(w) else "numpy"
    return HaloQuantized(raw, hw, int(bits), matrix.shape, flat_kind, "float32")


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
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise TypeError(f"[{fn}] group_size must be an int, got {group_size!r}")
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"[{fn}] bits must be an int, got {bits!r}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"[{fn}] w holds non-finite values")
    group = matrix.shape[1] if group_size <= 0 else min(int(group_size), matrix.shape[1])
    codes, scales = _hw.rtn_quantize(matrix, int(bits), group)
    return RtnQuantized(codes, scales, int(bits), group, "torch" if is_torch_tensor(w) else "numpy")


def weighted_error(w: Any, w_hat: Any, sensitivity: Any = None) -> float:
    """sum s (w - w_hat)^2 / sum s w^2 (s = |w| when no sensitivity is given)."""
    a = as_float32_matrix("weighted_error", w).astype(np.float64)
    b = as_float32_matrix("weighted_error", w_hat, "w_hat").astype(np.float64)
    s = np.abs(a) if sensitivity is None else as_float32_matrix("weighted_error", sensitivity, "sensitivity")
    if a.shape != b.shape or s.shape != a.shape:
        raise ValueError(f"[weighted_error] shapes differ: {a.shape}, {b.shape}, {s.shape}")
    return float((s * (a - b) ** 2).sum() / max((s * a * a).sum(), 1e-300))
