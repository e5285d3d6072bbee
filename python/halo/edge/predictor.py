"""The semantic predictor of the edge runtime, per (layer, part): scores each group's
importance from the exchange's input (the critical set) and estimates a group's term for
compensation. Fitted on calibration text by ``make_plan`` (:mod:`halo.edge.plan`), stored
beside the plan, read back here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .model import (
    ATTN,
    FFN,
    Checkpoint,
    EdgeError,
    Spec,
    tensor_names,
)


@dataclass
class PartPredictor:
    """For one (layer, part): scores groups from the input (critical set) and estimates terms.

    score:    ``partition.Predictor`` arrays (relu(x A + a) B + b on standardised x)
    estimate: term_g(h) ~ [h U, 1] @ V[g]  (U: the top right-singular vectors of the part's
              input weights, V fitted by ridge least squares on calibration terms)"""

    a: np.ndarray
    a_bias: np.ndarray
    b: np.ndarray
    b_bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    basis: np.ndarray  # U [hidden, r]
    values: np.ndarray  # V [groups, r + 1, hidden]

    def scores(self, h: np.ndarray) -> np.ndarray:
        x = (np.asarray(h, dtype=np.float64) - self.mean) / self.scale
        return np.maximum(x @ self.a + self.a_bias, 0.0) @ self.b + self.b_bias

    def estimate(self, h: np.ndarray, group: int) -> np.ndarray:
        z = np.asarray(h, dtype=np.float32) @ self.basis
        v = self.values[group].astype(np.float32)
        return z @ v[:-1] + v[-1]


def _input_basis(checkpoint: Checkpoint, spec: Spec, layer: int, part: int, rank: int) -> np.ndarray:
    """Top right-singular vectors of the part's input weights (eigenvectors of W^T W)."""
    import torch

    names = tensor_names(spec, layer)
    keys = ("q", "k", "v") if part == ATTN else (("gate", "up") if spec.family == "llama" else ("up",))
    gram = sum(w.T.double() @ w.double() for w in (checkpoint.get(names[k] + ".weight") for k in keys))
    _, vectors = torch.linalg.eigh(gram)
    return vectors[:, -rank:].flip(1).float().contiguous().numpy()


class Calibration:
    """Collects, per (layer, part), inputs, term norms and the least-squares sums."""

    def __init__(self, spec: Spec, groups, checkpoint: Checkpoint, rank: int) -> None:
        self.spec, self.groups, self.rank = spec, groups, rank
        self.inputs: dict[tuple[int, int], list[np.ndarray]] = {}
        self.norms: dict[tuple[int, int], list[np.ndarray]] = {}
        # Least-squares sums per half of the calibration chunks (even, odd): the estimate
        # fitted on one half is scored on the other to decide how much to trust it.
        self.gram: dict[tuple[int, int, int], Any] = {}
        self.cross: dict[tuple[int, int, int], Any] = {}
        self.calls: dict[tuple[int, int], int] = {}
        self.basis = {
            (layer, part): _input_basis(checkpoint, spec, layer, part, rank)
            for layer in range(spec.layers)
            for part in (ATTN, FFN)
        }

    def __call__(self, layer: int, part: int, h, terms) -> None:
        import torch

        key = (layer, part)
        t = torch.stack(terms)  # [G, n, hidden]
        self.inputs.setdefault(key, []).append(h.numpy().copy())
        self.norms.setdefault(key, []).append(t.norm(dim=2).T.numpy().copy())  # [n, G]
        z = torch.cat([h @ torch.from_numpy(self.basis[key]), torch.ones(h.shape[0], 1)], dim=1)
        half = (*key, self.calls.get(key, 0) % 2)
        self.calls[key] = self.calls.get(key, 0) + 1
        self.gram[half] = self.gram.get(half, 0.0) + (z.T @ z).double()
        self.cross[half] = self.cross.get(half, 0.0) + (z.T[None] @ t).double()  # [G, r + 1, hidden]


def fit_scorers(xs: list[np.ndarray], ys: list[np.ndarray], rank: int, steps: int, seed: int) -> list[tuple]:
    """Fits the predictors of every (layer, part) at once (one batched Adam loop): per part
    ``relu(x A + a) B + b`` on standardised x, mean squared error on the group scores; the
    same model as ``halo.sched.partition.Predictor``, batched because a plan has hundreds of them."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    P, d = len(xs), xs[0].shape[1]
    n = max(x.shape[0] for x in xs)
    G = max(y.shape[1] for y in ys)
    X = torch.zeros(P, n, d)
    Y = torch.zeros(P, n, G)
    mask = torch.zeros(P, n, G)
    means, scales = [], []
    for i, (x, y) in enumerate(zip(xs, ys)):
        mean, scale = x.mean(0), x.std(0) + 1e-6
        means.append(mean)
        scales.append(scale)
        X[i, : x.shape[0]] = torch.from_numpy((x - mean) / scale)
        Y[i, : y.shape[0], : y.shape[1]] = torch.from_numpy(y)
        mask[i, : y.shape[0], : y.shape[1]] = 1
    A = (torch.randn(P, d, rank, generator=gen) / np.sqrt(d)).requires_grad_()
    a = torch.zeros(P, 1, rank, requires_grad=True)
    B = (torch.randn(P, rank, G, generator=gen) / np.sqrt(rank)).requires_grad_()
    b = ((Y * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)).requires_grad_()
    opt = torch.optim.Adam([A, a, B, b], lr=1e-2)
    for _ in range(int(steps)):
        opt.zero_grad()
        loss = (((torch.relu(X @ A + a) @ B + b - Y) ** 2) * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
    out = []
    for i, y in enumerate(ys):
        g = y.shape[1]

        def det(t):
            return t.detach().numpy().astype(np.float64)

        out.append((det(A[i]), det(a[i, 0]), det(B[i, :, :g]), det(b[i, 0, :g]), means[i], scales[i]))
    return out


def fit_predictors(cal: Calibration, steps: int, seed: int) -> dict[tuple[int, int], PartPredictor]:
    keys = sorted(cal.inputs)
    scorers = fit_scorers(
        [np.concatenate(cal.inputs[k]) for k in keys],
        [np.concatenate(cal.norms[k]) for k in keys],
        16,
        steps,
        seed,
    )
    out = {}
    for key, (a, a_bias, b, b_bias, mean, scale) in zip(keys, scorers):
        out[key] = PartPredictor(a, a_bias, b, b_bias, mean, scale, cal.basis[key], fit_estimates(cal, key))
    return out


def fit_estimates(cal: Calibration, key: tuple[int, int]) -> np.ndarray:
    """Per group V [r + 1, hidden] of the low-rank estimate, shrunk by how well it predicted
    the held-out half of the calibration: alpha = <est, true> / <est, est> there (clipped
    to [0, 1]), so an estimate that does not beat zero becomes zero."""

    def solve(gram, cross):
        ridge = 1e-3 * np.trace(gram) / gram.shape[0] * np.eye(gram.shape[0])
        return np.linalg.solve(gram + ridge, cross)  # [G, r + 1, hidden]

    halves = [(cal.gram.get((*key, i)), cal.cross.get((*key, i))) for i in (0, 1)]
    halves = [(g.numpy(), c.numpy()) for g, c in halves if g is not None]
    full = solve(sum(g for g, _ in halves), sum(c for _, c in halves))
    if len(halves) < 2:
        return np.zeros_like(full, dtype=np.float16)  # nothing held out: do not trust it
    alpha = np.zeros(full.shape[0])
    for (g_fit, c_fit), (g_test, c_test) in (halves, halves[::-1]):
        v = solve(g_fit, c_fit)
        hit = np.einsum("grh,grh->g", v, c_test)
        energy = np.einsum("grh,rs,gsh->g", v, g_test, v)
        alpha += 0.5 * np.clip(hit / np.maximum(energy, 1e-30), 0.0, 1.0)
    return (full * alpha[:, None, None]).astype(np.float16)


def load_predictors(path: Path, spec: Spec, groups) -> dict[tuple[int, int], PartPredictor]:
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise EdgeError(f"{path}: unreadable predictor file ({exc})") from None
    out = {}
    with data:
        for layer in range(spec.layers):
            for part in (ATTN, FFN):
                try:
                    fields = {
                        name: data[f"{layer}.{part}.{name}"] for name in PartPredictor.__dataclass_fields__
                    }
                except KeyError as exc:
                    raise EdgeError(f"{path}: predictor entry {exc} missing") from None
                p = PartPredictor(**fields)
                g = len(groups[layer][part])
                if p.b.shape[-1] != g or p.values.shape[0] != g or p.a.shape[0] != spec.hidden:
                    raise EdgeError(
                        f"{path}: predictor of layer {layer} part {part} does not fit the plan's groups"
                    )
                out[(layer, part)] = p
    return out


__all__ = ["Calibration", "PartPredictor", "fit_estimates", "fit_predictors", "load_predictors"]
