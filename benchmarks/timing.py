"""Interleaved timing shared by the benchmarks: the cases of one comparison run
A, B, C, A, B, C, ... so a load spike on this shared machine hits every case
alike, and each reports the minimum and the median of its repeats."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Timing:
    min: float  # seconds
    median: float

    def ms(self) -> str:
        return f"{self.min * 1e3:.2f}/{self.median * 1e3:.2f}"


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Times every case `repeats` times, round-robin, after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(min(times), statistics.median(times)) for name, times in samples.items()}
