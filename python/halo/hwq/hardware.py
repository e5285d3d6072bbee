"""The hardware the HALO quantizer plans for (``HardwareModel``): per-corner multiply delays and
MAC energies, DVFS operating points, the MAC array, sparse engine and memory system, parsed and
validated once in C++ (schema in docs/hwq.md); plus the argument checks the hwq calls share.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _core

_hw = _core.hwq

GRIDS = ("subset", "int4", "int8")
MODES = ("performance", "energy")
PRESETS = ("performance", "balanced", "accuracy")
ASSIGNS = ("sensitivity", "error_gain")
BASELINES = ("uniform", "w8a8", "fp16")


class HardwareModel:
    """Per-corner multiply delays and per-value MAC energies (4- and 8-bit grids), DVFS points, switch cost,
    MAC array, sparse engine, memory system and tile shape.

    Parsed and validated once into a C++ object (schema in docs/hwq.md; version-1 files still load);
    ``load``/``save`` read and write its JSON.
    """

    def __init__(self, text: str | None = None):
        if text is None:
            self._model = _hw.HardwareModel.default()
        else:
            self._model = _hw.HardwareModel.from_json(_check_str("HardwareModel", text))

    @classmethod
    def default(cls) -> HardwareModel:
        return cls()

    @classmethod
    def from_json(cls, text: str) -> HardwareModel:
        return cls(text)

    @classmethod
    def from_dict(cls, data: dict) -> HardwareModel:
        if not isinstance(data, dict):
            raise TypeError(f"[HardwareModel.from_dict] expected a dict, got {type(data).__name__}")
        return cls(json.dumps(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> HardwareModel:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise ValueError(f"[HardwareModel.load] cannot read {str(path)!r}: {reason}") from error
        return cls(text)

    def to_json(self) -> str:
        return self._model.to_json()

    def to_dict(self) -> dict:
        return json.loads(self._model.to_json())

    def save(self, path: str | os.PathLike) -> None:
        _atomic_write_text(path, self.to_json() + "\n")

    @property
    def energy_model(self) -> str:
        """``"activity"`` (per-value MAC energy, V^2, leakage, memory) or ``"power"`` (version-1 fixed power)."""
        return self._model.energy_model

    @property
    def operating_points(self) -> list[dict]:
        return [self._model.point(p) for p in range(self._model.num_points)]

    def delays(self, bits: int = 8, point: int | None = None) -> dict[int, float]:
        """Delay (ns) of a multiply by each value of the signed ``bits`` grid at ``point`` (default: nominal)."""
        _check_bits("HardwareModel.delays", bits)
        if point is None:
            point = max(self.nominal_point(bits), 0)
        table = self._model.delays(bits, _check_point("HardwareModel.delays", point))
        low = -(1 << (bits - 1))
        return {low + i: float(d) for i, d in enumerate(table)}

    def energies(self, bits: int = 8) -> dict[int, float]:
        """Energy (pJ) of one MAC by each value of the signed ``bits`` grid at 1 V (scaled by V^2 per point)."""
        _check_bits("HardwareModel.energies", bits)
        low = -(1 << (bits - 1))
        return {low + i: float(e) for i, e in enumerate(self._model.energies(bits))}

    def admitted(self, point: int, bits: int = 8) -> tuple[int, ...]:
        """Values of the signed ``bits`` grid whose delay at ``point`` fits its clock period."""
        _check_bits("HardwareModel.admitted", bits)
        return tuple(self._model.admitted(bits, _check_point("HardwareModel.admitted", point)))

    def nominal_point(self, bits: int = 8) -> int:
        """Fastest clock admitting the whole grid, lowest voltage there (the baselines' point); -1 if none."""
        _check_bits("HardwareModel.nominal_point", bits)
        return int(self._model.nominal_point(bits))

    def ladder(self, mode: str = "performance", bits: int = 8) -> tuple[int, ...]:
        """The points a run may use, nominal first (``mode`` performance: faster clocks; energy: lower volts)."""
        _check_bits("HardwareModel.ladder", bits)
        return tuple(self._model.ladder(check_choice("HardwareModel.ladder", "mode", mode, MODES), bits))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HardwareModel) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        points = ", ".join(
            f"({p['voltage']} V, {p['frequency_ghz']} GHz, book {p['book_size']})"
            for p in self.operating_points
        )
        return f"HardwareModel(points=[{points}], energy_model={self.energy_model!r})"


def _check_bits(function: str, bits: Any) -> int:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"[{function}] bits must be 4 or 8, got {bits!r}")
    return int(bits)


def _check_point(function: str, point: Any) -> int:
    if isinstance(point, bool) or not isinstance(point, (int, np.integer)):
        raise TypeError(f"[{function}] point must be an int, got {point!r}")
    return int(point)


def _check_str(function: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"[{function}] expected JSON text, got {type(value).__name__}")
    return value


def check_choice(function: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"[{function}] {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_int(function: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"[{function}] {name} must be an int, got {value!r}")
    return int(value)


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


__all__ = ["HardwareModel", "check_choice", "check_int"]
