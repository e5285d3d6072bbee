"""Model side of halo's edge runtime: a layer split into neuron groups, as the paper splits it.

Supported families: LLaMA-style decoders (Hugging Face ``LlamaForCausalLM`` folders, GQA, RoPE,
RMSNorm, SiLU-gated FFN) and BERT encoders (``BertModel`` folders such as all-MiniLM-L6-v2).
Every layer has two tensor-parallel exchanges: attention (part 0) and feed-forward (part 1).
A group's output is one additive term of its part's output:

* attention group: some query heads (GQA-aware: by default exactly the query heads that share
  one key/value head) with their q/k/v projection rows and o-projection columns; the worker
  keeps the key/value cache of its heads;
* FFN group: ``group_size`` intermediate neurons with their gate/up rows and down columns.

What runs on the split (weights, terms, the root's side) is :mod:`halo.edge.compute`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._moved import moved_names

ATTN, FFN = 0, 1
PART_NAMES = ("attention", "ffn")


class EdgeError(Exception):
    """A one-line, user-facing failure of the edge runtime (bad plan, unreachable worker...)."""


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


# names that moved to halo.edge.compute when this module was split
_MOVED = (
    "GroupWeights",
    "WEIGHT_FORMATS",
    "Nf4Matrix",
    "WeightStore",
    "KVCache",
    "rope_tables",
    "GroupCompute",
    "RootModel",
    "LocalCluster",
)
__getattr__ = moved_names(__name__, "halo.edge.compute", _MOVED)
