"""Compute side of halo's edge runtime: workers hold their groups' weights (``WeightStore``,
float32 or NF4) and compute the terms (``GroupCompute``, with the key/value cache of their
heads); the root holds embeddings, norms, biases and the output head (``RootModel``);
``LocalCluster`` runs every group in one process: the lossless reference and calibration.
The split itself (specs, groups, checkpoints) is :mod:`halo.edge.model`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .model import ATTN, FFN, Checkpoint, EdgeError, GroupDef, Spec, tensor_names


def _torch():
    import torch

    return torch


@dataclass
class GroupWeights:
    """One group's matrices as [out, in] float32 tensors or ``Nf4Matrix`` (biases float32)."""

    mats: dict[str, Any]


WEIGHT_FORMATS = ("float32", "nf4")
_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


class Nf4Matrix:
    """A weight held in halo's 4-bit NF4 format (bitsandbytes layout, blocks of 64); products
    run through halo's 4-bit kernel (``halo.lora.lora_forward`` with an empty adapter)."""

    def __init__(self, weight) -> None:
        from ..quant import quantize_4bit

        w = weight.detach().float().contiguous().numpy()
        self.shape = w.shape
        self.packed = quantize_4bit(w, quant_type="nf4", blocksize=64)
        self._a = np.zeros((1, w.shape[1]), np.float32)
        self._b = np.zeros((w.shape[0], 1), np.float32)

    def apply(self, h):
        from ..lora.linear import lora_forward

        torch = _torch()
        y = lora_forward(
            np.ascontiguousarray(h.detach().numpy(), dtype=np.float32), self.packed, self._a, self._b, 0.0
        )
        return torch.from_numpy(np.ascontiguousarray(y))


def _linear(h, w, bias=None):
    """h @ w.T (+ bias) for a float tensor or an Nf4Matrix."""
    torch = _torch()
    if isinstance(w, Nf4Matrix):
        y = w.apply(h)
        return y if bias is None else y + bias
    return torch.nn.functional.linear(h, w, bias)


class WeightStore:
    """The weights of the groups this worker computes.

    ``hold(groups)`` makes exactly those groups resident (loading the missing ones from the
    checkpoint, dropping the rest); ``get(key)`` hands one group's weights to the compute.
    This is the seam where loading groups in the background (issue 15) plugs in.
    """

    def __init__(self, checkpoint: Checkpoint, spec: Spec, weights: str = "float32") -> None:
        if weights not in WEIGHT_FORMATS:
            raise EdgeError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
        self.checkpoint, self.spec, self.weights = checkpoint, spec, weights
        self._held: dict[tuple[int, int, int], GroupWeights] = {}

    def hold(self, groups: Iterable[GroupDef]) -> tuple[int, int]:
        wanted = {g.key: g for g in groups}
        dropped = [k for k in self._held if k not in wanted]
        for k in dropped:
            del self._held[k]
        added = 0
        for key, g in wanted.items():
            if key not in self._held:
                self._held[key] = self._load(g)
                added += 1
        return added, len(dropped)

    def get(self, key: tuple[int, int, int]) -> GroupWeights:
        return self._held[key]

    def keys(self) -> list[tuple[int, int, int]]:
        return sorted(self._held)

    def _load(self, g: GroupDef) -> GroupWeights:
        spec, ck, names = self.spec, self.checkpoint, tensor_names(self.spec, g.layer)
        d = spec.head_dim
        mats: dict[str, Any] = {}
        bias = spec.family == "bert"
        if g.part == ATTN:
            qrows = np.concatenate([np.arange(h * d, (h + 1) * d) for h in g.heads])
            kvrows = np.concatenate([np.arange(h * d, (h + 1) * d) for h in g.kv])
            q = ck.get(names["q"] + ".weight")
            mats["q"] = q[qrows].contiguous()
            mats["k"] = ck.get(names["k"] + ".weight")[kvrows].contiguous()
            mats["v"] = ck.get(names["v"] + ".weight")[kvrows].contiguous()
            mats["o"] = ck.get(names["o"] + ".weight")[:, qrows].contiguous()
            if bias:
                mats["q_bias"] = ck.get(names["q"] + ".bias")[qrows].contiguous()
                mats["k_bias"] = ck.get(names["k"] + ".bias")[kvrows].contiguous()
                mats["v_bias"] = ck.get(names["v"] + ".bias")[kvrows].contiguous()
        else:
            rows = slice(g.start, g.stop)
            mats["up"] = ck.get(names["up"] + ".weight", rows=rows)
            mats["down"] = ck.get(names["down"] + ".weight", cols=rows)
            if spec.family == "llama":
                mats["gate"] = ck.get(names["gate"] + ".weight", rows=rows)
            else:
                mats["up_bias"] = ck.get(names["up"] + ".bias", rows=rows)
        if self.weights == "nf4":
            for key in _MATRICES:
                if key in mats:
                    mats[key] = Nf4Matrix(mats[key])
        return GroupWeights(mats)


class KVCache:
    """Keys/values of one key/value head of one layer, grown in place."""

    def __init__(self, head_dim: int) -> None:
        torch = _torch()
        self.k = torch.empty(0, head_dim)
        self.v = torch.empty(0, head_dim)
        self.length = 0

    def put(self, pos: int, k, v) -> None:
        torch = _torch()
        if pos > self.length:
            raise EdgeError(f"key/value cache holds {self.length} positions, got position {pos}")
        end = pos + k.shape[0]
        if end > self.k.shape[0]:
            grow = max(end, 2 * self.k.shape[0], 64)
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.empty(grow, old.shape[1])
                new[: self.length] = old[: self.length]
                setattr(self, name, new)
        self.k[pos:end] = k
        self.v[pos:end] = v
        # Positions are written in order within a sequence; writing at an earlier position
        # starts over (a new sequence), so what lies beyond is no longer valid.
        self.length = end


def rope_tables(spec: Spec, pos: int, n: int):
    torch = _torch()
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(pos, pos + n, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x, cos, sin):
    torch = _torch()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class GroupCompute:
    """A worker's math: the additive output term of each held group for a layer input."""

    def __init__(self, spec: Spec, store: WeightStore) -> None:
        self.spec, self.store = spec, store
        self.caches: dict[tuple[int, int], KVCache] = {}

    def reset(self) -> None:
        self.caches.clear()

    def cache_length(self, layer: int, kv: int) -> int:
        c = self.caches.get((layer, kv))
        return 0 if c is None else c.length

    def run(self, groups: list[GroupDef], h, pos: int, replay: bool = False) -> list[Any]:
        """Terms [n, hidden] of ``groups`` (all of one layer and part) for the input h [n, hidden].
        ``replay``: only (re)build the groups' key/value caches at these positions (a group
        that moved here after a re-plan gets the sequence so far this way)."""
        if not groups:
            return []
        if groups[0].part == FFN:
            return [] if replay else self._ffn(groups, h)
        return self._attention(groups, h, pos, replay)

    def _ffn(self, groups: list[GroupDef], h) -> list[Any]:
        torch = _torch()
        F = torch.nn.functional
        out = []
        for g in groups:
            w = self.store.get(g.key).mats
            if self.spec.family == "llama":
                act = F.silu(_linear(h, w["gate"])) * _linear(h, w["up"])
            else:
                act = F.gelu(_linear(h, w["up"], w["up_bias"]))
            out.append(_linear(act, w["down"]))
        return out

    def _attention(self, groups: list[GroupDef], h, pos: int, replay: bool) -> list[Any]:
        torch = _torch()
        spec, d = self.spec, self.spec.head_dim
        n = h.shape[0]
        share = spec.heads // spec.kv_heads
        llama = spec.family == "llama"
        if llama:
            cos, sin = rope_tables(spec, pos, n)
        out = []
        for g in groups:
            w = self.store.get(g.key).mats
            k = _linear(h, w["k"], w.get("k_bias")).view(n, len(g.kv), d).transpose(0, 1)
            v = _linear(h, w["v"], w.get("v_bias")).view(n, len(g.kv), d).transpose(0, 1)
            if llama:
                k = _rotate(k, cos, sin)
                keys, values = [], []
                for j, kv in enumerate(g.kv):
                    cache = self.caches.setdefault((g.layer, kv), KVCache(d))
                    cache.put(pos, k[j], v[j])
                    keys.append(cache.k[: pos + n])
                    values.append(cache.v[: pos + n])
                if replay:
                    continue
            else:
                keys, values = list(k), list(v)
            q = _linear(h, w["q"], w.get("q_bias")).view(n, len(g.heads), d).transpose(0, 1)
            if llama:
                q = _rotate(q, cos, sin)
            heads = []
            for i, head in enumerate(g.heads):
                j = g.kv.index(head // share)
                scores = (q[i] @ keys[j].T) / math.sqrt(d)
                if llama:
                    total = keys[j].shape[0]
                    mask = torch.arange(total)[None, :] > torch.arange(pos, pos + n)[:, None]
                    scores = scores.masked_fill(mask, float("-inf"))
                heads.append(torch.softmax(scores, dim=-1) @ values[j])
            out.append(_linear(torch.cat(heads, dim=-1), w["o"]))
        return out


# ----------------------------------------------------------------------------------------------
# Root side


class RootModel:
    """What the root computes itself: embeddings, norms, residuals, biases, the output head."""

    def __init__(self, checkpoint: Checkpoint, spec: Spec) -> None:
        self.spec = spec
        ck = checkpoint
        self.layer_weights = []
        for layer in range(spec.layers):
            names = tensor_names(spec, layer)
            w = {
                "ln_attn": ck.get(names["ln_attn"] + ".weight"),
                "ln_ffn": ck.get(names["ln_ffn"] + ".weight"),
            }
            if spec.family == "bert":
                w["ln_attn_b"] = ck.get(names["ln_attn"] + ".bias")
                w["ln_ffn_b"] = ck.get(names["ln_ffn"] + ".bias")
                w["o_bias"] = ck.get(names["o"] + ".bias")
                w["down_bias"] = ck.get(names["down"] + ".bias")
            self.layer_weights.append(w)
        if spec.family == "llama":
            self.embed_tokens = ck.get("model.embed_tokens.weight")
            self.norm = ck.get("model.norm.weight")
            self.lm_head = (
                self.embed_tokens if spec.tied or not ck.has("lm_head.weight") else ck.get("lm_head.weight")
            )
        else:
            self.word = ck.get("embeddings.word_embeddings.weight")
            self.position = ck.get("embeddings.position_embeddings.weight")
            self.token_type = ck.get("embeddings.token_type_embeddings.weight")
            self.emb_ln = (ck.get("embeddings.LayerNorm.weight"), ck.get("embeddings.LayerNorm.bias"))

    def _rms(self, x, weight):
        torch = _torch()
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.spec.eps))

    def _ln(self, x, weight, bias):
        torch = _torch()
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, self.spec.eps)

    def embed(self, ids, pos: int):
        torch = _torch()
        ids = torch.as_tensor(ids, dtype=torch.long)
        if self.spec.family == "llama":
            return self.embed_tokens[ids]
        positions = torch.arange(pos, pos + ids.shape[0])
        x = self.word[ids] + self.position[positions] + self.token_type[0]
        return self._ln(x, *self.emb_ln)

    def part_input(self, layer: int, part: int, x):
        if self.spec.family == "bert":
            return x
        w = self.layer_weights[layer]
        return self._rms(x, w["ln_attn"] if part == ATTN else w["ln_ffn"])

    def part_output(self, layer: int, part: int, x, total):
        w = self.layer_weights[layer]
        if self.spec.family == "llama":
            return x + total
        if part == ATTN:
            return self._ln(x + total + w["o_bias"], w["ln_attn"], w["ln_attn_b"])
        return self._ln(x + total + w["down_bias"], w["ln_ffn"], w["ln_ffn_b"])

    def head(self, x):
        """LLaMA: logits [n, vocab]; BERT: the mean-pooled, L2-normalised sentence embedding."""
        if self.spec.family == "llama":
            return self._rms(x, self.norm) @ self.lm_head.T
        pooled = x.mean(0)
        return pooled / pooled.norm().clamp_min(1e-12)

    def forward(self, ids, pos: int, exchange: Callable[[int, int, Any, int], Any]):
        """One forward of tokens ``ids`` at positions pos.. through ``exchange(layer, part, h, pos)``."""
        x = self.embed(ids, pos)
        for layer in range(self.spec.layers):
            for part in (ATTN, FFN):
                h = self.part_input(layer, part, x)
                x = self.part_output(layer, part, x, exchange(layer, part, h, pos))
        return self.head(x)


class LocalCluster:
    """Every group computed in this process: the lossless reference and calibration source.

    ``observer(layer, part, h, terms)`` (optional) sees each exchange's input and group terms."""

    def __init__(
        self, checkpoint: Checkpoint, spec: Spec, groups: list[list[list[GroupDef]]], weights: str = "float32"
    ) -> None:
        self.groups = groups
        self.store = WeightStore(checkpoint, spec, weights)
        self.store.hold(g for layer in groups for part in layer for g in part)
        self.compute = GroupCompute(spec, self.store)
        self.observer: Callable[..., None] | None = None

    def reset(self) -> None:
        self.compute.reset()

    def exchange(self, layer: int, part: int, h, pos: int):
        torch = _torch()
        terms = self.compute.run(self.groups[layer][part], h, pos)
        if self.observer is not None:
            self.observer(layer, part, h, terms)
        return torch.stack(terms).sum(0)
