"""What llama.cpp expects of a LLaMA-family model: tensor names, the Q/K row
order, the hyperparameter keys, and which ggml type each tensor gets in a file
of a given llama.cpp file type (the ``q4_k_m`` / ``q5_k_m`` mixtures).

The mixture rules are llama.cpp's ``llama_tensor_get_type`` for dense (non-MoE)
LLaMA / Mistral / Qwen2 models without an importance matrix, as of llama.cpp in
``llama-cpp-python==0.3.36``; ``docs/gguf.md`` lists them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FILE_TYPES", "ModelSpec", "gguf_tensor_name", "hf_tensor_name", "permute_rows", "plan_types"]

# llama.cpp file types: name -> (llama_ftype id, default ggml type of 2-D weights).
FILE_TYPES: dict[str, tuple[int, str]] = {
    "f32": (0, "F32"),
    "f16": (1, "F16"),
    "q4_0": (2, "Q4_0"),
    "q4_1": (3, "Q4_1"),
    "q8_0": (7, "Q8_0"),
    "q5_0": (8, "Q5_0"),
    "q5_1": (9, "Q5_1"),
    "q4_k_s": (14, "Q4_K"),
    "q4_k_m": (15, "Q4_K"),
    "q5_k_s": (16, "Q5_K"),
    "q5_k_m": (17, "Q5_K"),
    "q6_k": (18, "Q6_K"),
    "bf16": (32, "BF16"),
}
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION

_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
_BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
# Where a 256-block type goes when a row is not a multiple of 256 (llama.cpp's tensor_type_fallback).
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _fail(msg: str) -> None:
    raise ValueError(f"[export_gguf] {msg}")


@dataclass
class ModelSpec:
    arch: str  # GGUF architecture: "llama" or "qwen2"
    hf_arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int | None  # from config.json when given
    n_ctx: int | None
    vocab_size: int
    rms_eps: float
    rope: dict[str, Any]
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelSpec:
        archs = config.get("architectures") or []
        hf_arch = next((a for a in archs if a in _ARCHS), None)
        if hf_arch is None:
            _fail(
                f"{source}: architectures {archs} are not supported (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
            )
        if config.get("num_local_experts") or config.get("num_experts"):
            _fail(f"{source}: mixture-of-experts models are not supported")

        def need(key: str) -> int:
            v = config.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                _fail(f"{source}: {key} must be a positive integer, got {v!r}")
            return v

        n_head = need("num_attention_heads")
        n_head_kv = config.get("num_key_value_heads", n_head)
        if not isinstance(n_head_kv, int) or n_head_kv <= 0 or n_head % n_head_kv:
            _fail(f"{source}: num_key_value_heads {n_head_kv!r} must divide num_attention_heads {n_head}")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        if "rope_theta" not in rope and config.get("rope_theta") is not None:
            rope["rope_theta"] = config["rope_theta"]
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        rope_type = (rope.get("rope_type") or "default").lower()
        if rope_type not in ("default", "linear", "yarn", "llama3"):
            _fail(f"{source}: RoPE type {rope_type!r} is not supported (default, linear, yarn, llama3)")
        return cls(
            arch=_ARCHS[hf_arch],
            hf_arch=hf_arch,
            n_layer=need("num_hidden_layers"),
            n_embd=need("hidden_size"),
            n_ff=need("intermediate_size"),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=config.get("head_dim"),
            n_ctx=config.get("max_position_embeddings"),
            vocab_size=need("vocab_size"),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope=rope,
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def rope_dim(self) -> int:
        return self.head_dim if self.head_dim else self.n_embd // self.n_head

    def metadata(self) -> list[tuple[str, str, Any]]:
        """The architecture keys in the order llama.cpp's converter writes them."""
        a = self.arch
        out: list[tuple[str, str, Any]] = [(f"{a}.block_count", "uint32", self.n_layer)]
        if self.n_ctx:
            out.append((f"{a}.context_length", "uint32", self.n_ctx))
        out += [
            (f"{a}.embedding_length", "uint32", self.n_embd),
            (f"{a}.feed_forward_length", "uint32", self.n_ff),
            (f"{a}.attention.head_count", "uint32", self.n_head),
            (f"{a}.attention.head_count_kv", "uint32", self.n_head_kv),
        ]
        rope_type = (self.rope.get("rope_type") or "default").lower()
        factor = self.rope.get("factor")
        if rope_type == "linear" and factor is not None:
            out += [
                (f"{a}.rope.scaling.type", "string", "linear"),
                (f"{a}.rope.scaling.factor", "float32", factor),
            ]
        elif rope_type == "yarn" and factor is not None:
            out += [
                (f"{a}.rope.scaling.type", "string", "yarn"),
                (f"{a}.rope.scaling.factor", "float32", factor),
                (
                    f"{a}.rope.scaling.original_context_length",
                    "uint32",
                    self.rope["original_max_position_embeddings"],
                ),
            ]
        if self.rope.get("rope_theta") is not None:
            out.append((f"{a}.rope.freq_base", "float32", float(self.rope["rope_theta"])))
        out.append((f"{a}.attention.layer_norm_rms_epsilon", "float32", self.rms_eps))
        if self.head_dim:
            out += [(f"{a}.attention.key_length", "uint32", self.head_dim)]
            out += [(f"{a}.attention.value_length", "uint32", self.head_dim)]
        if a == "llama":
            out += [
                (f"{a}.vocab_size", "uint32", self.vocab_size),
                (f"{a}.rope.dimension_count", "uint32", self.rope_dim),
            ]
        return out

    def rope_freqs(self) -> np.ndarray | None:
        """LLaMA 3.1-style frequency factors (the rope_freqs.weight tensor), or None."""
        if (self.rope.get("rope_type") or "").lower() != "llama3":
            return None
        base = float(self.rope.get("rope_theta", 10000.0))
        dim = self.rope_dim
        freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor = float(self.rope.get("factor", 8.0))
        low, high = (
            float(self.rope.get("low_freq_factor", 1.0)),
            float(self.rope.get("high_freq_factor", 4.0)),
        )
        old_ctx = float(self.rope.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        out = []
        for f in freqs:
            wavelen = 2 * np.pi / float(f)
            if wavelen < high_wavelen:
                out.append(1.0)
            elif wavelen > low_wavelen:
                out.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        return np.asarray(out, dtype=np.float32)


_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_tensor_name(hf_name: str, n_layer: int) -> str | None:
    """GGUF name of a Hugging Face tensor; None for tensors llama.cpp does not use; ValueError if unknown."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    if _IGNORED.fullmatch(hf_name):
        return None
    m = _HF_LAYER.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        layer = int(m.group(1))
        if layer >= n_layer:
            _fail(f"tensor {hf_name!r} is in layer {layer}, but the model has {n_layer} layers")
        return f"blk.{layer}.{_LAYER_NAMES[m.group(2)]}"
    _fail(f"tensor {hf_name!r} has no llama.cpp counterpart in this architecture")
    return None


def hf_tensor_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor (None for ones transformers does not hold, e.g. rope_freqs)."""
    for hf, gg in _GLOBAL_NAMES.items():
        if gg == gguf_name:
            return hf
    m = _GGUF_LAYER.fullmatch(gguf_name)
    if m:
        for hf, gg in _LAYER_NAMES.items():
            if gg == m.group(2):
                return f"model.layers.{m.group(1)}.{hf}"
    if gguf_name == "rope_freqs.weight":
        return None
    raise ValueError(
        f"[import_gguf] tensor {gguf_name!r} has no Hugging Face counterpart in this architecture"
    )


def permute_rows(w: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    """The Q/K row order llama.cpp's RoPE expects: within each head, rows (0, 2, 4, ..., 1, 3, 5, ...)
    of Hugging Face's rotate-half layout become interleaved pairs. ``inverse`` undoes it."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        _fail(f"cannot permute {rows} rows for {n_head} heads")
    head = rows // n_head
    shaped = (
        w.reshape(n_head, head // 2, 2, *w.shape[1:])
        if inverse
        else w.reshape(n_head, 2, head // 2, *w.shape[1:])
    )
    return np.ascontiguousarray(shaped.swapaxes(1, 2)).reshape(w.shape)


def weight_sort_key(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order in files it writes: non-layer tensors first, then by layer, each by name."""
    m = _GGUF_LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)


def _allows_quantization(name: str, ndim: int) -> bool:
    # llama.cpp's tensor_allows_quantization, for the tensors a dense LLaMA/Qwen2 file holds.
    return ndim >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def plan_types(tensors: list[tuple[str, tuple[int, ...]]], file_type: str, spec: ModelSpec) -> dict[str, str]:
    """ggml type of every tensor ``(gguf name, dims in GGUF order)`` in a file of ``file_type``.

    ``tensors`` must be in file order (``weight_sort_key``): llama.cpp counts attn_v / ffn_down
    tensors in that order to decide which layers get more bits."""
    if file_type not in FILE_TYPES:
        _fail(f"type must be one of {', '.join(FILE_TYPES)}, got {file_type!r}")
    default = FILE_TYPES[file_type][1]
    quantized = default in _BLOCK
    tied = not any(name == "output.weight" for name, _ in tensors)
    n_attn_v = sum(1 for name, _ in tensors if "attn_v.weight" in name)
    is_70b = spec.n_layer == 80 and (spec.arch == "qwen2" or spec.n_head != spec.n_head_kv)
    i_attn_v = i_ffn_down = 0
    out: dict[str, str] = {}
    for name, dims in tensors:
        if not _allows_quantization(name, len(dims)):
            out[name] = "F32"
            continue
        if not quantized:
            out[name] = default
            continue
        new = default
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if dims[0] % _BLOCK[default]:
                new = "Q8_0"
            elif new != "Q8_0":
                new = "Q6_K"
        elif name == "token_embd.weight":
            pass
        elif "attn_v.weight" in name:
            if file_type in ("q4_k_m", "q5_k_m") and _use_more_bits(i_attn_v, n_attn_v):
                new = "Q6_K"
            elif file_type == "q4_k_s" and i_attn_v < 4:
                new = "Q5_K"
            if is_70b and new == "Q4_K":
                new = "Q5_K"
            i_attn_v += 1
        elif "ffn_down" in name:
            if file_type in ("q4_k_m", "q5_k_m") and _use_more_bits(i_ffn_down, spec.n_layer):
                new = "Q6_K"
            elif file_type == "q4_k_s" and i_ffn_down < spec.n_layer // 8:
                new = "Q5_K"
            i_ffn_down += 1
        if dims[0] % _BLOCK.get(new, 1):
            new = _FALLBACK.get(new, new)
            if dims[0] % _BLOCK.get(new, 1):
                new = "F16"
        out[name] = new
    return out
