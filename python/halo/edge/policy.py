"""Which terms of an exchange the root protects, and what it puts in place of the lost ones.

One object, ``TermPolicy``, holds the accuracy side of the ``halo`` policy so that the networked
root (``root.Root``) and the in-process loss simulator (``benchmarks/edge/
eval_edge_accuracy.py``) run the same code:

* ``critical(layer, part, x)``: the groups whose terms come reliably. Attention terms (a few
  large groups per layer whose loss also corrupts the key/value caches) and every term of a
  prefill (its errors stay in the caches of every later token) are all critical by default;
  for FFN decode exchanges the predictor scores the groups from the layer input and the
  smallest set holding ``coverage`` of the predicted term mass is critical, at least
  ``critical_fraction`` of the groups: when the predictor cannot tell the groups apart (flat
  scores) the set grows, when a few groups dominate it stays small.
* ``compensate(layer, part, x, out, received)``: fills the rows that did not arrive.
"""

from __future__ import annotations

import math

import numpy as np

from .model import ATTN, EdgeError
from .predictor import PartPredictor

COMPENSATIONS = ("zero", "previous", "predictor", "mean")
MEAN_DECAY = 0.9  # "mean": each received term moves the group's running mean by 1 - MEAN_DECAY


def compensate(mode: str, predictor: PartPredictor | None, x, out, received, state):
    """Fills the rows of ``out`` [groups, rows, hidden] that did not arrive (``received``
    False): ``zero`` leaves them 0, ``previous`` takes the group's previous row (or the value
    it had for the last token), ``predictor`` the predictor's low-rank estimate from the
    input x, ``mean`` the running mean of the group's received terms (zero before the first).
    ``state`` is (last value per group, whether there is one, running mean per group); returns
    the new state."""
    last, have = state[0], state[1]
    mean = state[2] if len(state) > 2 else np.zeros_like(last)
    if not received.all():
        for g in range(out.shape[0]):
            lost = ~received[g]
            if not lost.any():
                continue
            if mode == "predictor" and predictor is not None:
                out[g, lost] = predictor.estimate(x[lost], g)
            elif mode == "mean":
                out[g, lost] = mean[g]
            elif mode == "previous":
                for r in np.flatnonzero(lost):
                    if r > 0 and received[g, r - 1]:
                        out[g, r] = out[g, r - 1]
                    elif have[g]:
                        out[g, r] = last[g]
    got = received[:, -1]
    last = last.copy()
    last[got] = out[got, -1]
    mean = mean.copy()
    for g in np.flatnonzero(received.any(axis=1)):
        for r in np.flatnonzero(received[g]):
            mean[g] = MEAN_DECAY * mean[g] + (1 - MEAN_DECAY) * out[g, r]
    return last, have | got, mean


class TermPolicy:
    """The critical set and the compensation of one run (see the module's docstring)."""

    def __init__(
        self,
        groups,
        importance,
        predictors: dict[tuple[int, int], PartPredictor],
        critical_fraction: float = 0.25,
        compensation: str = "zero",
        coverage: float = 0.0,
        reliable_attention: bool = True,
        reliable_prefill: bool = True,
        wait_all: bool = False,
    ) -> None:
        if compensation not in COMPENSATIONS:
            raise EdgeError(f"compensation must be one of {', '.join(COMPENSATIONS)}, got {compensation!r}")
        if compensation == "predictor" and not predictors:
            raise EdgeError("compensation 'predictor' needs a plan with predictors (calibration_tokens > 0)")
        if not 0 <= critical_fraction <= 1:
            raise EdgeError(f"critical_fraction must be in [0, 1], got {critical_fraction!r}")
        if not (isinstance(coverage, (int, float)) and 0 <= coverage <= 1):
            raise EdgeError(f"coverage must be in [0, 1], got {coverage!r}")
        self.groups = groups
        self.importance = importance
        self.predictors = predictors
        self.critical_fraction = critical_fraction
        self.compensation = compensation
        self.coverage = float(coverage)
        self.reliable_attention = reliable_attention
        self.reliable_prefill = reliable_prefill
        self.wait_all = wait_all
        self.state: dict[tuple[int, int], tuple] = {}

    def critical(self, layer: int, part: int, x: np.ndarray) -> np.ndarray:
        """uint8 flags, one per group of (layer, part): 1 = sent reliably and waited for."""
        count = len(self.groups[layer][part])
        flags = np.zeros(count, dtype=np.uint8)
        if (
            self.wait_all
            or (self.reliable_attention and part == ATTN)
            or (self.reliable_prefill and x.shape[0] > 1)
        ):
            flags[:] = 1
            return flags
        p = self.predictors.get((layer, part))
        scores = p.scores(x).mean(0) if p is not None else np.asarray(self.importance[layer][part], float)
        order = np.argsort(-scores, kind="stable")
        k = min(count, math.ceil(self.critical_fraction * count))
        if self.coverage > 0:
            mass = np.cumsum(np.maximum(scores[order], 0.0))
            if mass[-1] > 0:
                k = max(k, int(np.searchsorted(mass, self.coverage * mass[-1] * (1 - 1e-9))) + 1)
        flags[order[: min(k, count)]] = 1
        return flags

    def compensate(self, layer: int, part: int, x, out, received) -> None:
        key = (layer, part)
        count, _, hidden = out.shape
        zeros = np.zeros((count, hidden), np.float32)
        state = self.state.get(key, (zeros, np.zeros(count, bool), zeros))
        self.state[key] = compensate(self.compensation, self.predictors.get(key), x, out, received, state)
