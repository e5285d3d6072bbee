"""What every way of running an edge model shares: the run options (``RunOptions``), the
per-run figures (``Stats``), generation and embedding over a ``forward`` (``Runner``), and the
lossless single-process reference (``Local``). The networked root is :mod:`halo.edge.root`,
the store-backed local runner :mod:`halo.edge.streaming`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .compute import LocalCluster, RootModel
from .model import Checkpoint, EdgeError, Spec, layout, read_spec
from .policy import COMPENSATIONS

POLICIES = ("halo", "tcp", "reliable-udp")


@dataclass
class RunOptions:
    policy: str = "halo"
    compensation: str | None = None  # None: "predictor" when the plan has predictors, else "zero"
    deadline_factor: float = 1.5  # deadline = factor x the monitor's latency estimate + slack
    deadline_slack: float = 0.5e-3
    initial_deadline: float = 0.05  # before the monitor has a latency estimate
    critical_fraction: float | None = None  # None: the plan's (the least share of FFN groups protected)
    coverage: float = 0.0  # halo: protect FFN groups until they hold this share of the predicted mass
    # Opt-in (docs/edge.md): in the loss simulator they keep SmolLM2 within +5 % perplexity at
    # 5 % loss, but on a 30 % link the extra reliable traffic stalls a worker into silence.
    reliable_attention: bool = False  # halo, causal models: attention terms are all critical
    reliable_prefill: bool = False  # halo, causal models: every term of a multi-row forward is critical
    hard_timeout: float | None = None  # longest wait for one exchange; None: 0.5 s (halo), 10 s (baselines)
    silent_timeout: float | None = None  # drop a worker unheard for this long; None: max(2 s, hard_timeout)
    connect_timeout: float = 5.0
    load_timeout: float = 120.0
    replan: bool = True  # re-place groups when the loss estimates drift (halo)
    drift_threshold: float = 0.03
    monitor_alpha: float = 0.005  # per group observation: ~240 per worker and token on SmolLM2
    duplicate_critical: bool = True  # halo: an unreliable copy of each critical message first
    duplicate_other: bool = False  # halo: each non-critical partial sent twice (unreliable)
    threads: int = 1
    weights: str = "float32"  # how workers hold their groups: "float32" or "nf4" (halo's 4-bit kernel)

    def check(self) -> RunOptions:
        if self.policy not in POLICIES:
            raise EdgeError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        from .compute import WEIGHT_FORMATS

        if self.weights not in WEIGHT_FORMATS:
            raise EdgeError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weights!r}")
        if self.compensation is not None and self.compensation not in COMPENSATIONS:
            raise EdgeError(
                f"compensation must be one of {', '.join(COMPENSATIONS)}, got {self.compensation!r}"
            )
        for name in ("deadline_factor", "connect_timeout", "load_timeout", "initial_deadline"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise EdgeError(f"{name} must be a positive number, got {value!r}")
        for name in ("hard_timeout", "silent_timeout"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            ):
                raise EdgeError(f"{name} must be a positive number, got {value!r}")
        if self.critical_fraction is not None and not 0 <= self.critical_fraction <= 1:
            raise EdgeError(f"critical_fraction must be in [0, 1], got {self.critical_fraction!r}")
        if not (
            isinstance(self.coverage, (int, float))
            and math.isfinite(self.coverage)
            and 0 <= self.coverage <= 1
        ):
            raise EdgeError(f"coverage must be in [0, 1], got {self.coverage!r}")
        return self


@dataclass
class Exchange:
    """What one exchange cost and delivered (the root's record)."""

    step: int
    layer: int
    part: int
    rows: int
    seconds: float
    expected: int  # group rows awaited
    delivered: int
    critical: int  # critical group rows awaited
    end: str


@dataclass
class Stats:
    exchanges: list[Exchange] = field(default_factory=list)
    replans: list[dict[str, Any]] = field(default_factory=list)
    dead: dict[int, str] = field(default_factory=dict)  # worker -> why it was dropped
    stale: int = 0
    duplicates: int = 0
    malformed: int = 0  # partials that did not fit their exchange (shape, group, owner): lost
    rejected: int = 0  # group rows with non-finite values: counted as lost, compensated

    def delivered_fraction(self) -> float:
        expected = sum(e.expected for e in self.exchanges)
        return 1.0 if expected == 0 else sum(e.delivered for e in self.exchanges) / expected


class Runner:
    """Generation, scoring and embedding on top of ``forward(ids, pos)``."""

    spec: Spec

    def forward(self, ids: Sequence[int], pos: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def generate(self, prompt: Sequence[int], tokens: int) -> dict[str, Any]:
        """Greedy decoding: the prompt in one forward (prefill), then ``tokens`` single steps."""
        import torch

        if self.spec.family != "llama":
            raise EdgeError("generate needs a causal (LLaMA) model; use embed for BERT")
        if not prompt:
            raise EdgeError("the prompt is empty")
        if len(prompt) + tokens > self.spec.max_positions:
            raise EdgeError(f"prompt + tokens exceed the model's {self.spec.max_positions} positions")
        t0 = time.monotonic()
        logits = finite(self.forward(list(prompt), 0), 0)
        prefill = time.monotonic() - t0
        out, decode = [], []
        nxt = int(torch.argmax(logits[-1]))
        for i in range(tokens):
            out.append(nxt)
            if i == tokens - 1:
                break
            t0 = time.monotonic()
            logits = finite(self.forward([nxt], len(prompt) + i), len(prompt) + i)
            decode.append(time.monotonic() - t0)
            nxt = int(torch.argmax(logits[-1]))
        return {"tokens": out, "prefill_s": prefill, "decode_s": decode}

    def score(self, ids: Sequence[int], prefill: int = 1) -> dict[str, Any]:
        """Teacher-forced: the first ``prefill`` tokens in one forward, then one token per
        forward; returns per-position NLL of the next token, argmax and forward times."""
        import torch

        ids = list(ids)
        if len(ids) < prefill + 1 or prefill < 1:
            raise EdgeError("score needs more tokens than the prefill")
        nll, top, times = [], [], []
        pos = 0
        while pos < len(ids) - 1:
            n = prefill if pos == 0 else 1
            t0 = time.monotonic()
            logits = finite(self.forward(ids[pos : pos + n], pos), pos)
            times.append(time.monotonic() - t0)
            logp = torch.log_softmax(logits.double(), dim=-1)
            for r in range(n):
                if pos + r + 1 < len(ids):
                    nll.append(-float(logp[r, ids[pos + r + 1]]))
                    top.append(int(torch.argmax(logits[r])))
            pos += n
        return {"nll": nll, "argmax": top, "forward_s": times}

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        if self.spec.family != "bert":
            raise EdgeError("embed needs a BERT model")
        return finite(self.forward(list(ids), 0), 0).numpy()


def finite(values, pos: int):
    """Logits or an embedding, refused if any value is NaN or infinite (never passed on silently)."""
    import torch

    if not bool(torch.isfinite(values).all()):
        raise EdgeError(f"the forward at position {pos} produced non-finite values")
    return values


class Local(Runner):
    """Every group in this process, no network: the lossless float32 reference."""

    def __init__(
        self,
        model_dir: str,
        group_size: int = 128,
        heads_per_group: int | None = None,
        weights: str = "float32",
    ) -> None:
        from .model import default_heads_per_group

        self.spec = read_spec(model_dir)
        ck = Checkpoint(model_dir)
        hpg = default_heads_per_group(self.spec) if heads_per_group is None else heads_per_group
        self.cluster = LocalCluster(ck, self.spec, layout(self.spec, group_size, hpg), weights)
        self.model = RootModel(ck, self.spec)

    def forward(self, ids: Sequence[int], pos: int):
        import torch

        with torch.no_grad():
            return self.model.forward(ids, pos, self.cluster.exchange)


__all__ = ["POLICIES", "Exchange", "Local", "RunOptions", "Runner", "Stats"]
