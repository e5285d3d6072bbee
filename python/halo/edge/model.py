"""Model side of halo's edge runtime: a layer split into neuron groups, as the paper splits it.

Supported families: LLaMA-style decoders (Hugging Face ``LlamaForCausalLM`` folders, GQA, RoPE,
RMSNorm, SiLU-gated FFN) and BERT encoders (``BertModel`` folders such as all-MiniLM-L6-v2).
Every layer has two tensor-parallel exchanges: attention (part 0) and feed-forward (part 1).
A group's output is one additive term of its part's output:

* attention group: some query heads (GQA-aware: by default exactly the query heads that share
  one key/value head) with their q/k/v projection rows and o-projection columns; the worker
  keeps the key/value cache of its heads;
* FFN group: ``group_size`` intermediate neurons with their gate/up rows and down columns.

The root holds embeddings, norms, biases and the output head (``RootModel``); workers hold
their groups' weights (``WeightStore``) and compute the terms (``GroupCompute``).
``LocalCluster`` runs every group in one process: the lossless reference and calibration.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ATTN, FFN = 0, 1
PART_NAMES = ("attention", "ffn")


class EdgeError(Exception):
    """A one-line, user-facing failure of the edge runtime (bad plan, unreachable worker...)."""


def _torch():
    import torch

    return torch


@dataclass(frozen=True)
class Spec:
    family: str  # "llama" | "bert"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    eps: float
    rope_theta: float
    max_positions: int
    tied: bool


def _positive(config: dict, key: str, path: Path, limit: int) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise EdgeError(f"{path}: '{key}' must be an integer in [1, {limit}], got {value!r}")
    return value


def read_spec(model_dir: str | os.PathLike) -> Spec:
    """The model's shape from its config.json (LLaMA or BERT), checked field by field."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeError(f"{model_dir}: no config.json (not a Hugging Face model folder)") from None
    except (OSError, ValueError) as exc:
        raise EdgeError(f"{path}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise EdgeError(f"{path}: expected a JSON object")
    kind = config.get("model_type")
    if kind not in ("llama", "bert"):
        raise EdgeError(f"{path}: model_type must be 'llama' or 'bert', got {kind!r}")
    hidden = _positive(config, "hidden_size", path, 65535)
    heads = _positive(config, "num_attention_heads", path, 4096)
    spec: dict[str, Any] = {
        "family": kind,
        "hidden": hidden,
        "layers": _positive(config, "num_hidden_layers", path, 4096),
        "heads": heads,
        "inter": _positive(config, "intermediate_size", path, 1 << 20),
        "vocab": _positive(config, "vocab_size", path, 1 << 22),
        "max_positions": _positive(config, "max_position_embeddings", path, 1 << 22),
    }
    if kind == "llama":
        kv = (
            _positive(config, "num_key_value_heads", path, 4096) if "num_key_value_heads" in config else heads
        )
        head_dim = config.get("head_dim") or hidden // heads
        if heads % kv or head_dim * heads != hidden and "head_dim" not in config:
            raise EdgeError(f"{path}: {heads} heads do not split into {kv} key/value heads")
        rope = config.get("rope_parameters") or {}
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", (config.get("rope_scaling") or {}).get("rope_type", "default"))
        if rope_type != "default":
            raise EdgeError(f"{path}: rope_type {rope_type!r} is not supported (only 'default')")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise EdgeError(f"{path}: LLaMA layers with biases are not supported")
        eps = config.get("rms_norm_eps", 1e-6)
        spec.update(kv_heads=kv, head_dim=int(head_dim), eps=float(eps), rope_theta=float(theta))
        spec["tied"] = bool(config.get("tie_word_embeddings", False))
    else:
        if hidden % heads:
            raise EdgeError(f"{path}: hidden_size {hidden} is not a multiple of {heads} heads")
        if config.get("hidden_act", "gelu") != "gelu":
            raise EdgeError(f"{path}: hidden_act {config.get('hidden_act')!r} is not supported (only 'gelu')")
        spec.update(kv_heads=heads, head_dim=hidden // heads, eps=float(config.get("layer_norm_eps", 1e-12)))
        spec.update(rope_theta=0.0, tied=False)
    return Spec(**spec)


def fingerprint(model_dir: str | os.PathLike) -> str:
    """A short hash of config.json and the safetensors headers: the same model on root and workers."""
    root = Path(model_dir)
    digest = hashlib.sha256((root / "config.json").read_bytes())
    for file in sorted(root.glob("*.safetensors")):
        with open(file, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            digest.update(head + f.read(min(size, 1 << 26)))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class GroupDef:
    layer: int
    part: int
    index: int
    heads: tuple[int, ...] = ()  # attention: query heads
    kv: tuple[int, ...] = ()  # attention: the key/value heads they read
    start: int = 0  # ffn: neurons [start, stop)
    stop: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.layer, self.part, self.index)


def default_heads_per_group(spec: Spec) -> int:
    """GQA-aware: one group per key/value head (LLaMA); two heads per group for BERT."""
    return spec.heads // spec.kv_heads if spec.family == "llama" else min(2, spec.heads)


def layout(spec: Spec, group_size: int, heads_per_group: int) -> list[list[list[GroupDef]]]:
    """Groups of every layer: ``layout[layer][part]`` is a list of GroupDef."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not 0 < group_size <= spec.inter:
        raise EdgeError(f"group_size must be an integer in [1, {spec.inter}], got {group_size!r}")
    if isinstance(heads_per_group, bool) or not isinstance(heads_per_group, int):
        raise EdgeError(f"heads_per_group must be an integer, got {heads_per_group!r}")
    if not 0 < heads_per_group <= spec.heads:
        raise EdgeError(f"heads_per_group must be in [1, {spec.heads}], got {heads_per_group}")
    share = spec.heads // spec.kv_heads
    out = []
    for layer in range(spec.layers):
        attn = []
        for i, h0 in enumerate(range(0, spec.heads, heads_per_group)):
            heads = tuple(range(h0, min(h0 + heads_per_group, spec.heads)))
            kv = tuple(sorted({h // share for h in heads}))
            attn.append(GroupDef(layer, ATTN, i, heads=heads, kv=kv))
        ffn = [
            GroupDef(layer, FFN, i, start=n0, stop=min(n0 + group_size, spec.inter))
            for i, n0 in enumerate(range(0, spec.inter, group_size))
        ]
        if len(attn) > 65535 or len(ffn) > 65535:
            raise EdgeError("too many groups per layer for the wire format (at most 65535)")
        out.append([attn, ffn])
    return out


def group_cost(spec: Spec, group: GroupDef, bytes_per_weight: float = 4.0) -> dict[str, float]:
    """Per decode token: FLOPs, weight bytes and float16 bytes on the wire each way (sched cost model)."""
    io_bytes = 2.0 * spec.hidden
    if group.part == ATTN:
        weights = spec.hidden * spec.head_dim * (2 * len(group.heads) + 2 * len(group.kv))
    else:
        weights = (3 if spec.family == "llama" else 2) * spec.hidden * (group.stop - group.start)
    return {
        "flops": 2.0 * weights,
        "weight_bytes": weights * bytes_per_weight,
        "exchange_bytes": io_bytes,
        "input_bytes": io_bytes,
    }


# ----------------------------------------------------------------------------------------------
# Checkpoint access


class Checkpoint:
    """Named tensors of a safetensors model folder (one file or an index of shards), read lazily."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.root = Path(model_dir)
        files = sorted(self.root.glob("*.safetensors"))
        if not files:
            raise EdgeError(f"{model_dir}: no *.safetensors weights")
        self._where: dict[str, Any] = {}
        self._handles = []
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:
                raise EdgeError(f"{file}: unreadable safetensors file ({exc})") from None
            self._handles.append(handle)
            for name in handle.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                self._where[name] = handle
        prefixes = ("", "bert.", "model.")
        self._prefix = next(
            (p for p in prefixes if any(k.startswith(p + "encoder.") for k in self._where)), ""
        )

    def name(self, name: str) -> str:
        for candidate in (name, self._prefix + name):
            if candidate in self._where:
                return candidate
        raise EdgeError(f"{self.root}: tensor '{name}' is missing")

    def has(self, name: str) -> bool:
        return name in self._where or self._prefix + name in self._where

    def get(self, name: str, rows: slice | None = None, cols: slice | None = None):
        full = self.name(name)
        view = self._where[full].get_slice(full)
        if rows is None and cols is None:
            t = view[:]
        elif cols is None:
            t = view[rows]
        else:
            t = view[rows if rows is not None else slice(None), cols]
        return t.float().contiguous()


def tensor_names(spec: Spec, layer: int) -> dict[str, str]:
    if spec.family == "llama":
        p = f"model.layers.{layer}."
        return {
            "q": p + "self_attn.q_proj",
            "k": p + "self_attn.k_proj",
            "v": p + "self_attn.v_proj",
            "o": p + "self_attn.o_proj",
            "gate": p + "mlp.gate_proj",
            "up": p + "mlp.up_proj",
            "down": p + "mlp.down_proj",
            "ln_attn": p + "input_layernorm",
            "ln_ffn": p + "post_attention_layernorm",
        }
    p = f"encoder.layer.{layer}."
    return {
        "q": p + "attention.self.query",
        "k": p + "attention.self.key",
        "v": p + "attention.self.value",
        "o": p + "attention.output.dense",
        "ln_attn": p + "attention.output.LayerNorm",
        "up": p + "intermediate.dense",
        "down": p + "output.dense",
        "ln_ffn": p + "output.LayerNorm",
    }


# ----------------------------------------------------------------------------------------------
# Worker side: weights of the held groups and their compute


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
