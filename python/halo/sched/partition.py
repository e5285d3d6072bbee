"""Neuron groups of a transformer layer, their importance, and a low-rank predictor.

A group is either some attention heads (their q/k/v output columns and o input
rows together) or ``group_size`` FFN intermediate neurons (gate/up output
columns and down input rows together), so each group's partial result is one
additive term of the layer's output. Supported layers: Hugging Face LLaMA-style
decoder layers (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``) and
BERT layers (``attention.self.{query,key,value}``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``), or a model holding them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "NeuronGroup",
    "Predictor",
    "ffn_partials",
    "ffn_weights",
    "importance",
    "neuron_groups",
    "recall_at_k",
]


@dataclass
class NeuronGroup:
    kind: str  # "ffn" or "attn"
    layer: int
    index: np.ndarray  # intermediate neurons (ffn) or heads (attn)
    flops: float  # per token
    weight_bytes: float
    exchange_bytes: float  # partial result per token (hidden floats)
    input_bytes: float  # layer input per token
    importance: float = 0.0


def _layers(model_or_layer: Any) -> list[Any]:
    for path in ("model.layers", "layers", "encoder.layer", "bert.encoder.layer"):
        obj = model_or_layer
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    return [model_or_layer]


def _parts(layer: Any) -> dict[str, Any]:
    """Weights as NumPy float32 [out, in] and the layer's head count."""

    def w(m: Any) -> np.ndarray:
        return m.weight.detach().float().cpu().numpy()

    if hasattr(layer, "mlp") and hasattr(layer, "self_attn"):
        a, f = layer.self_attn, layer.mlp
        heads = getattr(a, "num_heads", None) or a.config.num_attention_heads
        return {
            "q": w(a.q_proj),
            "k": w(a.k_proj),
            "v": w(a.v_proj),
            "o": w(a.o_proj),
            "gate": w(f.gate_proj),
            "up": w(f.up_proj),
            "down": w(f.down_proj),
            "heads": int(heads),
            "act": "silu",
        }
    if hasattr(layer, "intermediate") and hasattr(layer, "attention"):
        s = layer.attention.self
        return {
            "q": w(s.query),
            "k": w(s.key),
            "v": w(s.value),
            "o": w(layer.attention.output.dense),
            "gate": None,
            "up": w(layer.intermediate.dense),
            "up_bias": layer.intermediate.dense.bias.detach().float().numpy(),
            "down": w(layer.output.dense),
            "heads": int(s.num_attention_heads),
            "act": "gelu",
        }
    raise TypeError(
        f"[neuron_groups] unsupported layer type {type(layer).__name__}: expected a LLaMA or BERT layer"
    )


def neuron_groups(
    model_or_layer: Any,
    group_size: int = 64,
    heads_per_group: int = 1,
    bytes_per_weight: float = 2.0,
    bytes_per_activation: float = 2.0,
) -> list[NeuronGroup]:
    """Split every layer into head groups and FFN groups with a per-token cost model."""
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"[neuron_groups] group_size must be a positive int, got {group_size!r}")
    if not isinstance(heads_per_group, int) or heads_per_group <= 0:
        raise ValueError(f"[neuron_groups] heads_per_group must be a positive int, got {heads_per_group!r}")
    out: list[NeuronGroup] = []
    for li, layer in enumerate(_layers(model_or_layer)):
        p = _parts(layer)
        hidden = p["up"].shape[1]
        inter = p["up"].shape[0]
        heads = p["heads"]
        head_dim = p["q"].shape[0] // heads
        io_bytes = hidden * bytes_per_activation
        for h0 in range(0, heads, heads_per_group):
            idx = np.arange(h0, min(h0 + heads_per_group, heads))
            cols = len(idx) * head_dim
            kv_cols = cols * p["k"].shape[0] // p["q"].shape[0]
            weights = hidden * (2 * cols + 2 * kv_cols)
            out.append(
                NeuronGroup("attn", li, idx, 2.0 * weights, weights * bytes_per_weight, io_bytes, io_bytes)
            )
        mats = 3 if p["gate"] is not None else 2
        for n0 in range(0, inter, group_size):
            idx = np.arange(n0, min(n0 + group_size, inter))
            weights = mats * hidden * len(idx)
            out.append(
                NeuronGroup("ffn", li, idx, 2.0 * weights, weights * bytes_per_weight, io_bytes, io_bytes)
            )
    return out


def ffn_weights(layer: Any) -> dict[str, Any]:
    """The layer's FFN weights as NumPy (up/gate [inter, hidden], down [hidden, inter])."""
    return _parts(layer)


def _act(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "silu":
        return x / (1.0 + np.exp(-x))
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def ffn_partials(parts: dict[str, Any], x: np.ndarray, groups: list[NeuronGroup]) -> np.ndarray:
    """Each FFN group's additive output term for tokens x [n, hidden]: [groups, n, hidden]."""
    pre = x @ parts["up"].T + parts.get("up_bias", 0.0)
    h = _act(pre, parts["act"]) if parts["gate"] is None else _act(x @ parts["gate"].T, parts["act"]) * pre
    return np.stack([h[:, g.index] @ parts["down"][:, g.index].T for g in groups])


def importance(
    model_or_layer: Any, groups: list[NeuronGroup], calibration: np.ndarray | None = None, layer: int = 0
) -> np.ndarray:
    """Importance of the FFN groups of ``layer``: without calibration, the product of
    the groups' up and down weight norms (static); with calibration inputs
    [n, hidden], the mean norm of each group's output term over the tokens.
    Attention groups of that layer get the static norm of their o rows x v columns.
    Returns one score per group in ``groups`` and stores it in ``group.importance``."""
    p = _parts(_layers(model_or_layer)[layer])
    scores = np.zeros(len(groups))
    mine = [i for i, g in enumerate(groups) if g.layer == layer]
    ffn = [i for i in mine if groups[i].kind == "ffn"]
    if calibration is not None:
        x = np.asarray(calibration, dtype=np.float32).reshape(-1, p["up"].shape[1])
        parts = ffn_partials(p, x, [groups[i] for i in ffn])
        scores[ffn] = np.linalg.norm(parts, axis=2).mean(axis=1)
    else:
        for i in ffn:
            idx = groups[i].index
            scores[i] = np.linalg.norm(p["up"][idx]) * np.linalg.norm(p["down"][:, idx])
    head_dim = p["q"].shape[0] // p["heads"]
    for i in mine:
        if groups[i].kind == "attn":
            # With grouped-query attention several query heads share one value head.
            share = p["heads"] // (p["v"].shape[0] // head_dim)
            cols = np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in groups[i].index])
            vcols = np.concatenate(
                [np.arange((h // share) * head_dim, (h // share + 1) * head_dim) for h in groups[i].index]
            )
            scores[i] = np.linalg.norm(p["o"][:, cols]) * np.linalg.norm(p["v"][vcols]) / np.sqrt(len(cols))
    for i in mine:
        groups[i].importance = float(scores[i])
    return scores


def recall_at_k(predicted: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over rows of |top-k(predicted) & top-k(truth)| / k."""
    p = np.argsort(-predicted, axis=-1)[..., :k]
    t = np.argsort(-truth, axis=-1)[..., :k]
    p, t = np.atleast_2d(p), np.atleast_2d(t)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(p, t)]))


class Predictor:
    """Low-rank scorer ``scores = relu(x A + a) B + b`` (hidden width ``rank``), fitted
    on calibration pairs (layer input -> per-group output-term norm) by Adam on the
    mean squared error, in the spirit of contextual-sparsity (Deja Vu) predictors.
    Cheap to run before the layer: d*rank + rank*groups multiply-adds per token."""

    def __init__(
        self,
        a: np.ndarray,
        a_bias: np.ndarray,
        b: np.ndarray,
        b_bias: np.ndarray,
        mean: np.ndarray,
        scale: np.ndarray,
    ) -> None:
        self.a, self.a_bias, self.b, self.b_bias, self.mean, self.scale = a, a_bias, b, b_bias, mean, scale

    @classmethod
    def fit(
        cls,
        inputs: np.ndarray,
        targets: np.ndarray,
        rank: int = 16,
        steps: int = 600,
        lr: float = 1e-2,
        seed: int = 0,
    ) -> Predictor:
        import torch

        x = np.asarray(inputs, dtype=np.float32)
        y = np.asarray(targets, dtype=np.float32)
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"[Predictor.fit] need inputs [n, d] and targets [n, groups], got {x.shape} and {y.shape}"
            )
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"[Predictor.fit] rank must be a positive int, got {rank!r}")
        mean, scale = x.mean(0), x.std(0) + 1e-6
        xt = torch.from_numpy((x - mean) / scale)
        yt = torch.from_numpy(y)
        gen = torch.Generator().manual_seed(seed)
        l1 = torch.nn.Linear(x.shape[1], rank)
        l2 = torch.nn.Linear(rank, y.shape[1])
        with torch.no_grad():
            for layer in (l1, l2):
                layer.weight.copy_(
                    torch.randn(layer.weight.shape, generator=gen) / np.sqrt(layer.weight.shape[1])
                )
                layer.bias.zero_()
            l2.bias.copy_(yt.mean(0))
        opt = torch.optim.Adam(list(l1.parameters()) + list(l2.parameters()), lr=lr)
        for _ in range(int(steps)):
            opt.zero_grad()
            loss = torch.mean((l2(torch.relu(l1(xt))) - yt) ** 2)
            loss.backward()
            opt.step()

        def det(t):
            return t.detach().numpy().astype(np.float64)

        return cls(det(l1.weight).T, det(l1.bias), det(l2.weight).T, det(l2.bias), mean, scale)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        x = np.asarray(inputs, dtype=np.float64)
        if x.ndim not in (1, 2) or x.shape[-1] != self.a.shape[0]:
            raise ValueError(f"[Predictor.predict] inputs must end in {self.a.shape[0]}, got shape {x.shape}")
        h = np.maximum((x - self.mean) / self.scale @ self.a + self.a_bias, 0.0)
        return h @ self.b + self.b_bias
