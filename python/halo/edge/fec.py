"""Forward error correction of the non-critical terms: the code rate from the measured loss.

A worker sends its unreliable terms of an exchange in parity sets of at most ``k`` datagrams,
each followed by one parity datagram (their XOR, built and checked in C++:
``include/halo/edge/wire.hpp``); the root rebuilds any one lost datagram of a set at once
instead of compensating it at the deadline. ``k`` per worker: fixed (``RunOptions.fec = K``),
off, or chosen here from the loss that worker's unreliable terms see (``"auto"``).

A datagram stays lost when it and at least one other datagram of its set (parity included)
are lost: p (1 - (1 - p)^k) on independent loss p, at 1/k extra traffic. ``code_rate`` picks the
largest k that leaves at most ``RESIDUAL`` of the loss unrepaired, and turns FEC off below
``OFF_BELOW`` (where parity would be pure overhead).
"""

from __future__ import annotations

import math
from typing import Any

from .model import EdgeError

try:
    from .._core import edge as _edge

    FEC_MAX_K = int(_edge.FEC_MAX_K)
except ImportError:  # pragma: no cover - the compiled module is part of every install
    FEC_MAX_K = 16

__all__ = ["FEC_MAX_K", "OFF_BELOW", "RESIDUAL", "FecRate", "check_fec", "code_rate"]

OFF_BELOW = 0.005  # estimated loss under which parity is not sent
RESIDUAL = 0.2  # the share of the loss a parity set may leave unrepaired (with independent loss)


def check_fec(value: Any) -> str | int:
    """``"auto"``, ``"off"`` or K in [1, FEC_MAX_K] (an int or its decimal text); else EdgeError."""
    if isinstance(value, str) and value in ("auto", "off"):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= FEC_MAX_K:
        return value
    raise EdgeError(f"fec must be 'auto', 'off' or a parity set size 1..{FEC_MAX_K}, got {value!r}")


def code_rate(loss: float) -> int:
    """Data datagrams per parity datagram for an estimated loss rate (0: off). Smaller k
    (more parity) as the loss grows: 5 % -> 4, 10 % -> 2, 1 % -> 16 (the most), 30 % -> 1
    (the parity is a copy)."""
    if not math.isfinite(loss) or loss < OFF_BELOW:
        return 0
    if loss >= 1:
        return 1
    k = int(math.log(1 - RESIDUAL) / math.log(1 - loss))  # the largest k with (1-p)^k >= 1-RESIDUAL
    return max(1, min(FEC_MAX_K, k))


class FecRate:
    """Per worker: an exponentially weighted estimate of the share of its unreliable term rows
    that the link lost (rows missing at the deadline plus rows rebuilt from parity), and the
    code rate for it. The root's loss monitor counts critical terms too (they always arrive),
    which hides part of the loss; this one sees only the datagrams FEC protects."""

    def __init__(self, workers: int, alpha: float = 0.02) -> None:
        self.alpha = alpha
        self.loss = [0.0] * workers

    def observe(self, w: int, rows: int, lost: int) -> None:
        if rows > 0:
            self.loss[w] += self.alpha * (lost / rows - self.loss[w])

    def k(self, w: int) -> int:
        return code_rate(self.loss[w])
