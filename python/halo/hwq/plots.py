"""Optional matplotlib figures for HALO results (needs the ``plot`` extra).

- ``plot_tile_frequencies(q, path)``: the clock (or, in energy mode, voltage) of each tile of a layer, as a map.
- ``plot_error_vs_speedup(points, path)``: weighted error against estimated speed-up per setting.
Both save a PNG (temporary file, then rename) and return the path.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import numpy as np

from .quantizer import HaloQuantized


def _pyplot(function: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError(f"[{function}] plots need matplotlib (pip install 'halo-llm[plot]')") from error
    return plt


def _save(figure, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    handle, temp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".png")
    os.close(handle)
    try:
        figure.savefig(temp, format="png", dpi=100)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return path


def plot_tile_frequencies(q: HaloQuantized, path: str | os.PathLike, title: str | None = None) -> str:
    """A heat map of the clock (GHz; the voltage in energy mode) each tile runs at, laid out as the matrix."""
    if not isinstance(q, HaloQuantized):
        raise TypeError(f"[plot_tile_frequencies] expected a HaloQuantized, got {type(q).__name__}")
    plt = _pyplot("plot_tile_frequencies")
    grid_rows, grid_cols = q.grid
    # Energy mode keeps one clock: show the voltage each tile runs at instead.
    values, label = (
        (q.plan.voltages, "voltage (V)") if q.mode == "energy" else (q.plan.frequencies_ghz, "clock (GHz)")
    )
    shown = np.array(values)[q.plan.point].reshape(grid_rows, grid_cols)
    figure, axes = plt.subplots(figsize=(4 + grid_cols * 0.15, 3 + grid_rows * 0.15))
    image = axes.imshow(shown, cmap="viridis", vmin=min(values), vmax=max(values))
    figure.colorbar(image, ax=axes, label=label)
    axes.set_xlabel(f"tile column ({q.tile_shape[1]} inputs)")
    axes.set_ylabel(f"tile row ({q.tile_shape[0]} outputs)")
    axes.set_title(title or f"{q.shape[0]}x{q.shape[1]}, {q.plan.switches} switches")
    figure.tight_layout()
    try:
        return _save(figure, path)
    finally:
        plt.close(figure)


def plot_error_vs_speedup(points: Iterable[tuple[str, float, float]], path: str | os.PathLike) -> str:
    """Scatter of (label, estimated speed-up, weighted error) settings."""
    points = list(points)
    if not points:
        raise ValueError("[plot_error_vs_speedup] no points to plot")
    plt = _pyplot("plot_error_vs_speedup")
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, speedup, error in points:
        axes.scatter([speedup], [error])
        axes.annotate(label, (speedup, error), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel("estimated speed-up vs uniform at nominal point")
    axes.set_ylabel("sensitivity-weighted error")
    axes.set_yscale("log")
    figure.tight_layout()
    try:
        return _save(figure, path)
    finally:
        plt.close(figure)
