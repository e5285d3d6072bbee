from typing import Any

import numpy as np
import numpy.typing as npt

def default_model() -> str: ...
def normalize_model(text: str) -> str: ...
def active_rows(value: int) -> int: ...
def bit_span(value: int) -> int: ...
def structural_delay(value: int, bits: int) -> float: ...
def code_book(model: str, bits: int, point: int) -> list[int]: ...
def nominal_point(model: str, bits: int) -> int: ...
def plan_dvfs(model: str, wanted: list[int], macs: list[int], max_switches: int) -> tuple[list[int], list[int], int]: ...
def quantize(
    weights: npt.ArrayLike,
    sensitivity: npt.ArrayLike | None,
    model: str,
    bits: int,
    tile_rows: int,
    tile_cols: int,
    salient_fraction: float,
    outlier_sigma: float,
    max_switches: int,
    channel_scales: bool,
    tier_fractions: list[float],
    tokens: int,
    backend: str = "auto",
) -> dict[str, Any]: ...
def dequantize(
    codes: npt.ArrayLike,
    scales: npt.ArrayLike,
    tile_cols: int,
    indptr: npt.ArrayLike,
    indices: npt.ArrayLike,
    values: npt.ArrayLike,
) -> npt.NDArray[np.float32]: ...
def rtn_quantize(
    weights: npt.ArrayLike, bits: int, group_size: int
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]: ...
