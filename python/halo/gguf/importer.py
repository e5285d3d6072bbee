"""``import_gguf``: a llama.cpp GGUF model (LLaMA / Mistral / Qwen2 architecture)
to a Hugging Face folder (config.json, safetensors, tokenizer), without
transformers.

Tensors are dequantized one at a time with halo's ggml dequantizers (every type
halo converts: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K,
Q5_K, Q6_K), the Q/K rows are put back into Hugging Face's rotate-half order,
and the safetensors file is streamed through halo's writer into a temp folder
that is renamed into place when complete. Before a byte is written the GGUF keys
are checked against the tensors (``halo.gguf.check``: layer count, shapes,
vocabulary) and the output path against the input (``halo._output``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _output
from .._core import io as _core_io
from ..io import safetensors as hio
from .arch import ModelSpec, hf_tensor_name, permute_rows
from .check import check_tensors, expected_shapes
from .reader import GGUFFile, read
from .vocab import hf_tokenizer_files

__all__ = ["ImportSummary", "import_gguf"]

_HF_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}
_DTYPES = {
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
}
_SHARD_BYTES = 5 << 30


def _fail(msg: str) -> None:
    raise ValueError(f"[import_gguf] {msg}")


@dataclass
class ImportSummary:
    out_dir: str
    tensors: int
    bytes_written: int
    seconds: float
    tokenizer: bool

    def __str__(self) -> str:
        tok = "" if self.tokenizer else " (no tokenizer: the GGUF vocabulary type is not supported)"
        return (
            f"imported {self.tensors} tensors ({self.bytes_written / 2**20:.1f} MiB) in {self.seconds:.1f} s "
            f"-> {self.out_dir}{tok}"
        )


def _int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    v = meta.get(key, default)
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or int(v) <= 0:
        _fail(f"key {key} must be a positive integer, got {v!r}")
    return int(v)


def _config(f: GGUFFile, arch: str, dtype: str) -> dict[str, Any]:
    m = f.metadata
    hf_arch, model_type = _HF_ARCH[arch]
    n_embd = _int(m, f"{arch}.embedding_length")
    n_head = _int(m, f"{arch}.attention.head_count")
    n_head_kv = _int(m, f"{arch}.attention.head_count_kv", n_head)
    tokens = m.get("tokenizer.ggml.tokens")
    vocab = int(m.get(f"{arch}.vocab_size", len(tokens) if isinstance(tokens, list) else 0))
    if vocab <= 0:
        vocab = int(f.tensors["token_embd.weight"].shape[0])
    head_dim = int(m.get(f"{arch}.attention.key_length", n_embd // n_head))
    rope_theta = float(m.get(f"{arch}.rope.freq_base", 10000.0))
    rope: dict[str, Any] = {"rope_theta": rope_theta, "rope_type": "default"}
    scaling = m.get(f"{arch}.rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope.update(rope_type=scaling, factor=float(m[f"{arch}.rope.scaling.factor"]))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = int(m[f"{arch}.rope.scaling.original_context_length"])
    elif scaling not in (None, "none"):
        _fail(f"RoPE scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in f.tensors:
        _fail(
            "LLaMA 3.1-style rope_freqs are not supported by import (the scaling parameters are not in the file)"
        )
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": n_embd,
        "intermediate_size": _int(m, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _int(m, f"{arch}.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(m.get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(m.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_parameters": rope,
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }
    if arch == "llama":
        config.update(attention_bias="blk.0.attn_q.bias" in f.tensors, mlp_bias=False, pretraining_tp=1)
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {
            k: v for k, v in rope.items() if k != "rope_theta"
        }  # transformers 4.x spelling
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        tid = m.get(f"tokenizer.ggml.{key}")
        if isinstance(tid, int):
            config[f"{typ}_token_id"] = tid
    return config


def _check_tensors(f: GGUFFile, path: str | os.PathLike, arch: str, config: dict[str, Any]) -> None:
    """The GGUF keys against the tensors: layer count, every shape, the vocabulary."""
    m = f.metadata
    if m.get(f"{arch}.attention.value_length", config["head_dim"]) != config["head_dim"]:
        _fail(
            f"{path}: {arch}.attention.value_length {m[f'{arch}.attention.value_length']} differs from "
            f"key_length {config['head_dim']} (Hugging Face models have one head size)"
        )
    try:
        spec = ModelSpec.from_config(config, f"{path} metadata")
    except ValueError as exc:
        raise ValueError(str(exc).replace("[export_gguf]", "[import_gguf]", 1)) from None
    tokens = m.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) != spec.vocab_size:
        _fail(
            f"{path}: tokenizer.ggml.tokens holds {len(tokens)} tokens, the model's vocabulary is {spec.vocab_size}"
        )
    bias = arch == "qwen2" or bool(config.get("attention_bias"))
    described = (
        f"the metadata ({arch}, block_count {spec.n_layer}, embedding_length {spec.n_embd}, "
        f"vocabulary {spec.vocab_size})"
    )
    check_tensors(
        "import_gguf", f"the tensors of {path}", described, expected_shapes(spec, bias),
        {t.name: t.shape for t in f},
    )  # fmt: skip


def import_gguf(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    force: bool = False,
    progress: bool = True,
) -> ImportSummary:
    """Writes the GGUF model at ``path`` as a Hugging Face folder ``out_dir`` with weights
    of ``dtype`` (float32, float16 or bfloat16). ValueError on bad input."""
    t0 = time.monotonic()
    if dtype not in _DTYPES:
        _fail(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    st_dtype = _DTYPES[dtype]
    dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[st_dtype]
    out = Path(out_dir)
    guard = _output.check("import_gguf", out, [(path, "input file")], "folder", force)
    f = read(path)
    arch = f.architecture
    if arch not in _HF_ARCH:
        _fail(f"{path}: architecture {arch!r} is not supported (llama, qwen2)")
    config = _config(f, arch, dtype)
    _check_tensors(f, path, arch, config)
    n_head, n_head_kv = config["num_attention_heads"], config["num_key_value_heads"]

    plan: list[tuple[str, str]] = []  # (gguf name, hf name)
    for t in f:
        hf = hf_tensor_name(t.name)
        if hf is not None:
            plan.append((t.name, hf))
    try:
        tok_files = hf_tokenizer_files(f.metadata)
    except ValueError:
        if f.metadata.get("tokenizer.ggml.model") == "gpt2":
            raise
        tok_files = {}

    written = 0
    bar = None
    with guard.writing(), contextlib.ExitStack() as bars:
        tmp = guard.temp
        # Shards of at most _SHARD_BYTES, in file order.
        elem = 4 if st_dtype == "F32" else 2
        shards: list[list[tuple[str, str]]] = [[]]
        size = 0
        for gname, hf in plan:
            nbytes = f.tensors[gname].numel * elem
            if shards[-1] and size + nbytes > _SHARD_BYTES:
                shards.append([])
                size = 0
            shards[-1].append((gname, hf))
            size += nbytes
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan), unit="tensor", desc="import-gguf", leave=False)
            bars.callback(bar.close)
        weight_map: dict[str, str] = {}
        for shard_name, shard in zip(names, shards):
            specs = [(hf, st_dtype, list(f.tensors[g].shape)) for g, hf in shard]
            writer = hio.SafetensorsWriter(str(tmp / shard_name), specs, {"format": "pt"})
            for gname, hf in shard:
                w = f.numpy(gname)
                if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias")):
                    w = permute_rows(w, n_head, inverse=True)
                elif arch == "llama" and gname.endswith(("attn_k.weight", "attn_k.bias")):
                    w = permute_rows(w, n_head_kv, inverse=True)
                flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
                data = flat if st_dtype == "F32" else _core_io.from_float32(flat, st_dtype)
                writer.write(hf, data)
                written += data.nbytes
                weight_map[hf] = shard_name
                f.release_pages()
                if bar is not None:
                    bar.update(1)
            writer.finish()
        if len(shards) > 1:
            index = {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for name, content in tok_files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
        guard.commit()
    return ImportSummary(str(out), len(plan), written, time.monotonic() - t0, bool(tok_files))
