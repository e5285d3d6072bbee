"""``export_gguf``: a Hugging Face LLaMA / Mistral / Qwen2 folder (optionally with
a PEFT LoRA adapter) straight to a llama.cpp GGUF file in one streaming pass.

Each tensor is read from the memory-mapped safetensors, converted to float32 a
slab of rows at a time, merged with its LoRA delta (halo's merge math, as
``halo merge`` applies it), reordered for llama.cpp's RoPE (Q/K rows), and
quantized with halo's ggml-exact quantizers into the type llama.cpp's own
``llama-quantize`` would choose for that tensor (see ``halo.gguf.arch``). No
merged float copy is written. Before a byte is written, every tensor's name and shape is
checked against config.json (``halo.gguf.check``) and the output path against the inputs
(``halo._output``); the file is assembled in a temp file beside the target and renamed into
place when complete. The file carries ``halo.output`` = "halo export-gguf", the mark that
lets ``--force`` replace it later.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import _output
from .._core import gguf as _g
from ..io import safetensors as hio
from ..io.adapter import LoraModule, read_adapter
from ..lora.merge_checkpoint import apply_lora, base_shards, to_float32
from .arch import (
    FILE_TYPES,
    QUANTIZATION_VERSION,
    ModelSpec,
    gguf_tensor_name,
    permute_rows,
    plan_types,
    weight_sort_key,
)
from .check import OUTPUT_KEY, check_tensors, expected_shapes
from .vocab import export_metadata as tokenizer_metadata

__all__ = ["ExportSummary", "export_gguf"]

_FLOAT = {"F32", "F16", "BF16", "F64"}
# Rows are converted, merged and quantized in slabs of about this many float32 bytes, so peak
# memory stays near one slab however large the embedding table is.
_SLAB_BYTES = 32 << 20


def _fail(msg: str) -> None:
    raise ValueError(f"[export_gguf] {msg}")


@dataclass
class ExportSummary:
    out: str
    file_type: str
    tensors: int
    merged_modules: int
    bytes_written: int
    seconds: float
    types: dict[str, int] = field(default_factory=dict)  # ggml type -> tensor count

    def __str__(self) -> str:
        mix = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items(), key=lambda kv: -kv[1]))
        lora = f", {self.merged_modules} LoRA modules merged" if self.merged_modules else ""
        return (
            f"exported {self.tensors} tensors as {self.file_type} ({mix}){lora}: "
            f"{self.bytes_written / 2**20:.1f} MiB in {self.seconds:.1f} s -> {self.out}"
        )


@dataclass
class _Source:
    hf_name: str
    gguf_name: str
    file: Any  # SafetensorsFile, or None for generated tensors
    st_dtype: str
    shape: tuple[int, ...]
    generated: np.ndarray | None = None


def _read_config(model: Path) -> dict[str, Any]:
    path = model / "config.json"
    if not path.is_file():
        _fail(f"{model} has no config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        _fail(f"{path} is not valid JSON: {exc}")
    if not isinstance(config, dict):
        _fail(f"{path} does not hold a JSON object")
    if "text_config" in config and isinstance(config["text_config"], dict):
        config = {**config, **config["text_config"]}
    if config.get("quantization_config"):
        _fail(
            f"{path}: the checkpoint is already quantized ({config['quantization_config'].get('quant_method')}); export needs float weights"
        )
    return config


def _halo_made(path: Path) -> bool:
    """The mark --force looks for: a GGUF whose ``halo.output`` names a halo command."""
    from .reader import read

    return str(read(path).metadata.get(OUTPUT_KEY, "")).startswith("halo ")


def _sources(model: Path, spec: ModelSpec) -> list[_Source]:
    try:
        shard_names, weight_map, _ = base_shards(model)
    except ValueError as exc:
        raise ValueError(str(exc).replace("[merge]", "[export_gguf]", 1)) from None
    files = {s: hio.open_safetensors(model / s) for s in shard_names}
    if weight_map is not None:
        for n, s in weight_map.items():
            if n not in files[s]:
                _fail(f"model.safetensors.index.json maps {n!r} to {s}, but that shard does not hold it")
    out: list[_Source] = []
    seen: set[str] = set()
    for f in files.values():
        for n in f.names():
            if n in seen:
                _fail(f"tensor {n!r} appears in two shards")
            seen.add(n)
            gname = gguf_tensor_name(n, spec.n_layer)
            if gname is None:
                continue
            st, shape, _, _ = f.info(n)
            if st not in _FLOAT:
                _fail(f"tensor {n!r} has dtype {st}; export needs floating-point weights")
            out.append(_Source(n, gname, f, st, tuple(shape)))
    names = {s.gguf_name for s in out}
    if "token_embd.weight" not in names:
        _fail(f"{model} has no model.embed_tokens.weight")
    if "output.weight" not in names and not spec.tied:
        _fail(f"{model} has no lm_head.weight and config.json does not tie the word embeddings")
    if (freqs := spec.rope_freqs()) is not None:
        out.append(_Source("", "rope_freqs.weight", None, "F32", freqs.shape, freqs))
    return sorted(out, key=lambda s: weight_sort_key(s.gguf_name))


def _qkv_bias(config: dict[str, Any], spec: ModelSpec) -> bool:
    # Qwen2 always has q/k/v biases; LLaMA / Mistral when config.json says attention_bias.
    return spec.arch == "qwen2" or bool(config.get("attention_bias", False))


def _lora_plan(
    adapter_dir: str | os.PathLike, sources: list[_Source]
) -> tuple[dict[str, Any], dict[str, np.ndarray], bool]:
    """LoRA modules by base tensor name, whole-tensor replacements, fan_in_fan_out; everything checked."""
    if not Path(adapter_dir).is_dir():
        _fail(f"adapter folder {adapter_dir} does not exist")
    adapter = read_adapter(adapter_dir)
    fan = adapter.config.fan_in_fan_out
    by_name = {s.hf_name: s for s in sources}
    lora: dict[str, Any] = {}
    for mod_name, mod in adapter.modules.items():
        wname = f"{mod_name}.weight"
        src = by_name.get(wname)
        if src is None:
            _fail(f"adapter module {mod_name!r} has no weight {wname!r} among the tensors llama.cpp uses")
        if len(src.shape) != 2:
            _fail(f"adapter module {mod_name!r} targets {wname!r} of shape {list(src.shape)}, not a matrix")
        out_f, in_f = (src.shape[1], src.shape[0]) if fan else src.shape
        if mod.lora_A.shape[1] != in_f or mod.lora_B.shape[0] != out_f:
            _fail(
                f"adapter module {mod_name!r} (lora_A {list(mod.lora_A.shape)}, lora_B {list(mod.lora_B.shape)}) "
                f"does not fit base tensor {wname!r} of shape {list(src.shape)}"
            )
        lora[wname] = mod
    saved: dict[str, np.ndarray] = {}
    for n, arr in adapter.saved_tensors.items():
        src = by_name.get(n)
        if src is None:
            _fail(f"adapter replaces {n!r} (modules_to_save), which is not among the tensors llama.cpp uses")
        if tuple(arr.shape) != src.shape:
            _fail(f"adapter tensor {n!r} has shape {list(arr.shape)}, base has {list(src.shape)}")
        if n in adapter.saved_bf16:
            arr = hio.bf16_bits_to_float32(arr)
        saved[n] = np.asarray(arr, dtype=np.float32)
    return lora, saved, fan


def _rows_per_slab(src: _Source, needs_whole: bool) -> int:
    rows = src.shape[0] if src.shape else 1
    if needs_whole or len(src.shape) != 2:
        return max(rows, 1)
    return max(1, min(rows, _SLAB_BYTES // max(1, 4 * src.shape[1])))


def _float_rows(src: _Source, r0: int, r1: int) -> np.ndarray:
    if src.generated is not None:
        return np.ascontiguousarray(src.generated[r0:r1], dtype=np.float32)
    view = src.file.get(src.hf_name)
    part = view[r0:r1] if view.ndim else view.reshape(1)
    return to_float32(part, src.st_dtype)


def _encode(arr: np.ndarray, ggml_type: str) -> np.ndarray:
    if ggml_type == "F32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    return _g.quantize(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1), ggml_type, "auto")


def export_gguf(
    model: str | os.PathLike,
    out: str | os.PathLike,
    type: str = "q4_k_m",
    adapter: str | os.PathLike | None = None,
    progress: bool = True,
    force: bool = False,
    pre_tokenizer: str | None = None,
    name: str | None = None,
) -> ExportSummary:
    """Writes ``model`` (a Hugging Face folder, merged with the PEFT ``adapter`` when given) to the
    GGUF file ``out`` as llama.cpp file type ``type``: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0,
    q5_1, q4_k_s, q4_k_m, q5_k_s, q5_k_m or q6_k. ValueError on bad input; nothing is left
    at ``out`` unless the export completed."""
    t0 = time.monotonic()
    if type not in FILE_TYPES:
        _fail(f"type must be one of {', '.join(FILE_TYPES)}, got {type!r}")
    model_dir, out_path = Path(model), Path(out)
    if not model_dir.is_dir():
        _fail(f"model folder {model_dir} does not exist")
    config = _read_config(model_dir)
    spec = ModelSpec.from_config(config, str(model_dir / "config.json"))
    inputs = [(model_dir, "model folder")] + ([(adapter, "adapter folder")] if adapter is not None else [])
    guard = _output.check("export_gguf", out_path, inputs, "file", force, _halo_made)
    sources = _sources(model_dir, spec)
    check_tensors(
        "export_gguf",
        f"the weights of {model_dir}",
        f"config.json ({spec.arch}, {spec.n_layer} layers, hidden {spec.n_embd}, vocabulary {spec.vocab_size})",
        expected_shapes(spec, _qkv_bias(config, spec)),
        {s.gguf_name: s.shape for s in sources},
    )
    lora, saved, fan = _lora_plan(adapter, sources) if adapter is not None else ({}, {}, False)

    dims = [(s.gguf_name, tuple(reversed(s.shape)) if s.shape else (1,)) for s in sources]
    types = plan_types(dims, type, spec)
    metadata: list[tuple[str, str, Any]] = [
        ("general.architecture", "string", spec.arch),
        ("general.type", "string", "model"),
        ("general.name", "string", name or model_dir.resolve().name),
        (OUTPUT_KEY, "string", "halo export-gguf"),
    ]
    metadata += spec.metadata()
    metadata += tokenizer_metadata(model_dir, spec.vocab_size, pre_tokenizer)
    # llama.cpp's quantizer rewrites these two last; keeping them last makes our files match its output.
    metadata += [
        ("general.quantization_version", "uint32", QUANTIZATION_VERSION),
        ("general.file_type", "uint32", FILE_TYPES[type][0]),
    ]

    with guard.writing():
        _write(guard.temp, metadata, dims, types, sources, spec, lora, saved, fan, progress)
        guard.commit()
    counts = Counter(types.values())
    return ExportSummary(
        str(out_path),
        type,
        len(sources),
        len(lora),
        guard.path.stat().st_size,
        time.monotonic() - t0,
        dict(counts),
    )


def _write(temp: Path, metadata, dims, types, sources, spec, lora, saved, fan, progress) -> None:
    writer = _g.GgufWriter(str(temp), metadata, [(n, list(d), types[n]) for n, d in dims], 32)
    bar = None
    try:
        if progress:
            from tqdm.auto import tqdm

            total = sum(int(np.prod(s.shape, dtype=np.int64)) * 4 for s in sources)
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="export-gguf", leave=False)
        for src in sources:
            ggml_type = types[src.gguf_name]
            permute_heads = 0
            if spec.arch == "llama" and src.gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
                permute_heads = spec.n_head
            elif spec.arch == "llama" and src.gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
                permute_heads = spec.n_head_kv
            mod = lora.get(src.hf_name)
            replaced = saved.get(src.hf_name)
            whole = bool(permute_heads) or (mod is not None and fan)
            step = _rows_per_slab(src, whole)
            rows = src.shape[0] if src.shape else 1
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                if replaced is not None:
                    w = np.ascontiguousarray(replaced[r0:r1] if replaced.ndim else replaced.reshape(1))
                else:
                    w = _float_rows(src, r0, r1)
                if mod is not None:
                    if fan:
                        w = apply_lora(w, mod, fan, src.hf_name)
                    else:
                        magnitude = None if mod.magnitude is None else mod.magnitude[r0:r1]
                        part = LoraModule(mod.name, mod.lora_A, mod.lora_B[r0:r1], mod.scaling, magnitude)
                        w = apply_lora(w, part, fan, src.hf_name)
                if permute_heads:
                    w = permute_rows(w, permute_heads)
                data = _encode(w, ggml_type)
                del w
                writer.write(src.gguf_name, data.reshape(-1).view(np.uint8))
                if src.file is not None:
                    src.file.release_pages()
                if bar is not None:
                    bar.update((r1 - r0) * 4 * int(np.prod(src.shape[1:], dtype=np.int64)))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
