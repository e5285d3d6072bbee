"""Streaming LoRA merge of a Hugging Face model folder, tensor by tensor.

``merge(base_dir, adapter_dir, out_dir)`` reads the base checkpoint through
memory maps (one tensor in memory at a time, plus its merged copy), applies every
LoRA delta (rank/alpha patterns, rsLoRA, fan_in_fan_out, DoRA) with
``halo.lora.merge``, and streams the result into shards of the same layout.
The output is assembled in a temporary folder next to ``out_dir``, fsynced, and
swapped into place only when complete (``halo._output``, the guard every writing
command shares: an output that overlaps an input is refused, ``--force`` replaces only
a folder halo wrote and never leaves ``out_dir`` missing, SIGTERM/SIGHUP clean up like
SIGINT, temp folders of killed runs are removed by the next run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _output
from .._core import io as _core_io
from ..io import safetensors as hio
from ..io.adapter import Adapter, read_adapter
from . import linear as hlora

__all__ = ["MergeSummary", "merge"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_FLOAT = {"F32", "F16", "BF16", "F64"}
_DTYPES = {
    "fp32": "F32",
    "float32": "F32",
    "fp16": "F16",
    "float16": "F16",
    "bf16": "BF16",
    "bfloat16": "BF16",
}
_TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Everything in a model folder except weights is copied (config, generation config, tokenizer, ...).
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_COPIED = (INDEX_NAME, _output.MARKER)  # written anew


@dataclass
class MergeSummary:
    out_dir: str
    tensors: int
    merged_modules: int
    replaced_tensors: int
    bytes_written: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"merged {self.merged_modules} LoRA modules into {self.tensors} tensors "
            f"({self.bytes_written / 2**20:.1f} MiB) in {self.seconds:.1f} s -> {self.out_dir}"
        )


def _fail(msg: str) -> None:
    raise ValueError(f"[merge] {msg}")


def base_shards(base: Path) -> tuple[list[str], dict[str, str] | None, dict[str, Any]]:
    """(shard file names in order, weight_map or None for a single file, index metadata)."""
    if not base.is_dir():
        _fail(f"base folder {base} does not exist")
    index = base / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            _fail(f"{index} is not a valid index (needs a JSON object with weight_map)")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            _fail(f"{index}: weight_map must map tensor names to file names")
        shards = list(dict.fromkeys(weight_map.values()))
        for s in shards:
            if "/" in s or s.startswith(".") or not (base / s).is_file():
                _fail(f"{index} names shard {s!r}, which is missing from {base}")
        return shards, weight_map, data.get("metadata", {})
    if (base / SINGLE_NAME).is_file():
        return [SINGLE_NAME], None, {}
    if (base / "pytorch_model.bin").is_file():
        _fail(
            f"{base} holds only pytorch_model.bin; re-save the model with save_pretrained(safe_serialization=True)"
        )
    _fail(f"{base} has neither {SINGLE_NAME} nor {INDEX_NAME}")
    raise AssertionError


def to_float32(arr: np.ndarray, st: str) -> np.ndarray:
    # Multi-threaded C++ conversion (bfloat16 arrives as uint16 bits).
    return _core_io.to_float32(np.ascontiguousarray(arr).reshape(-1), st).reshape(arr.shape)


def _from_float32(x: np.ndarray, st: str) -> np.ndarray:
    if st == "F32":
        return x
    return _core_io.from_float32(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), st).reshape(x.shape)


def apply_lora(w: np.ndarray, module, fan_in_fan_out: bool, name: str) -> np.ndarray:
    A, B = module.lora_A, module.lora_B
    out_f, in_f = (w.shape[1], w.shape[0]) if fan_in_fan_out else w.shape
    if A.shape[1] != in_f or B.shape[0] != out_f:
        _fail(
            f"adapter module {module.name!r} (lora_A {list(A.shape)}, lora_B {list(B.shape)}) does not fit "
            f"base tensor {name!r} of shape {list(w.shape)}"
        )
    merged = hlora.merge(w, A, B, module.scaling, fan_in_fan_out=fan_in_fan_out)
    _check_finite(merged, w, module, name)
    if module.magnitude is None:
        return merged
    # DoRA (as PEFT merges it): rescale each output row of W + delta to the learned magnitude;
    # the norm is taken over input features.
    rows = merged.T if fan_in_fan_out else merged
    norm = np.linalg.norm(rows.astype(np.float64), axis=1).astype(np.float32)
    factor = module.magnitude / norm
    return (factor[None, :] * merged) if fan_in_fan_out else (factor[:, None] * merged)


def _check_finite(merged: np.ndarray, w: np.ndarray, module, name: str) -> None:
    # |B A * scaling| <= r * max|A| * max|B| * |scaling|: when that bound is far below float32's
    # range the delta cannot overflow and the full scan is skipped (NaN in A or B fails the test).
    with np.errstate(over="ignore", invalid="ignore"):
        bound = (
            module.lora_A.shape[0]
            * float(np.abs(module.lora_A).max(initial=0.0))
            * float(np.abs(module.lora_B).max(initial=0.0))
            * abs(module.scaling)
        )
    if bound < 1e37:
        return
    if not np.isfinite(merged).all() and np.isfinite(w).all():
        _fail(
            f"merging adapter module {module.name!r} into {name!r} gives inf/NaN weights "
            f"(scaling {module.scaling:g}, largest |lora_A| x |lora_B| x r x scaling {bound:g})"
        )


class _Progress:
    def __init__(self, total_tensors: int, total_bytes: int, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.total_tensors, self.total_bytes = total_tensors, total_bytes
        self.tensors = self.bytes = 0
        self.start = self.last = time.monotonic()

    def step(self, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and self.tensors < self.total_tensors):
            return
        self.last = now
        frac = self.bytes / self.total_bytes if self.total_bytes else 1.0
        eta = (now - self.start) * (1 - frac) / frac if frac > 0 else 0.0
        bar = "#" * int(30 * frac)
        sys.stderr.write(
            f"\r[{bar:<30}] {self.tensors}/{self.total_tensors} tensors "
            f"{self.bytes / 2**20:.0f}/{self.total_bytes / 2**20:.0f} MiB ETA {eta:4.0f}s"
        )
        if self.tensors >= self.total_tensors:
            sys.stderr.write("\n")
        sys.stderr.flush()


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
# Config fields that set how many modules the model skeleton is built with (each such
# module holds at least one tensor, so none can exceed the checkpoint's tensor count).
_COUNT_FIELDS = frozenset(
    {
        "num_hidden_layers",
        "num_layers",
        "n_layer",
        "n_layers",
        "encoder_layers",
        "decoder_layers",
        "num_encoder_layers",
        "num_decoder_layers",
        "num_local_experts",
        "num_experts",
        "n_routed_experts",
        "moe_num_experts",
    }
)


def _linear_weights(base: Path, skip: set[str], shapes: dict[str, list[int]]) -> set[str]:
    """Names of weights that transformers' bitsandbytes path quantizes: nn.Linear weights except lm_head.

    config.json is checked against the tensors present (`shapes`) before the model skeleton is
    built: a hostile module count (num_hidden_layers 10**9) would hang and grow memory."""
    import torch
    import transformers

    cfg_path = base / "config.json"
    config = transformers.AutoConfig.from_pretrained(base)
    present = sorted({int(m.group(1)) for n in shapes for m in [_LAYER_INDEX.search(n)] if m})
    fields = {}
    for owner in (
        config,
        *(v for v in vars(config).values() if isinstance(v, transformers.PretrainedConfig)),
    ):
        for key, value in owner.to_dict().items():
            if key in _COUNT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
                fields[key] = value
    for key, value in fields.items():
        if value < 0 or value > len(shapes):
            _fail(
                f"{cfg_path}: {key} = {value} does not fit the checkpoint, which holds {len(shapes)} tensors"
            )
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and present and layers != len(present):
        _fail(
            f"{cfg_path}: num_hidden_layers = {layers}, but the checkpoint's tensors hold {len(present)} layers "
            f"({present[0]}..{present[-1]})"
        )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod_name.split(".")[-1] not in skip:
            wname = f"{mod_name}.weight"
            want = list(mod.weight.shape)
            if wname not in shapes:
                _fail(f"{cfg_path} describes a weight {wname!r} {want} that the checkpoint does not hold")
            if list(shapes[wname]) != want:
                _fail(
                    f"{cfg_path} gives {wname!r} the shape {want}, the checkpoint holds {list(shapes[wname])}"
                )
            names.add(wname)
    return names


def _quantized_entries(name: str, w32: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    from ..quant import quantize_4bit

    q = quantize_4bit(w32, quant_type="nf4", blocksize=64, double_quant=True)
    out = []
    for key, t in q.to_bnb_state_dict(name).items():
        st, arr = hio.to_numpy_bits("merge", key, t)
        out.append((key, st, arr))
    return out


def merge(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    quantize: str | None = None,
    progress: bool = True,
    force: bool = False,
    fsync: bool = True,
) -> MergeSummary:
    """Merges the LoRA adapter in ``adapter_dir`` into the model in ``base_dir`` and writes ``out_dir``.

    ``dtype`` ("fp32", "fp16", "bf16"; default: keep each tensor's dtype) sets the output
    floating-point type; ``quantize="nf4"`` writes a bitsandbytes NF4 (double-quant)
    checkpoint with ``quantization_config`` in ``config.json``. ``fsync=False`` skips the
    fsync of the output before it is swapped in (faster; a power cut may then leave a
    damaged output). ValueError on bad input; ``_output.Interrupted`` on SIGTERM/SIGHUP.
    """
    t0 = time.monotonic()
    base, out = Path(base_dir), Path(out_dir)
    if dtype is not None and dtype not in _DTYPES:
        _fail(f"dtype must be one of fp32, fp16, bf16, got {dtype!r}")
    if quantize not in (None, "nf4"):
        _fail(f"quantize must be None or 'nf4', got {quantize!r}")
    out_st = _DTYPES[dtype] if dtype else None
    if not Path(adapter_dir).is_dir():
        _fail(f"adapter folder {adapter_dir} does not exist")
    if not base.is_dir():
        _fail(f"base folder {base} does not exist")
    # Before anything else: with --force the old output is deleted, so it must not hold an input.
    guard = _output.check(
        "merge", out, [(base, "base folder"), (adapter_dir, "adapter folder")], "folder", force, fsync=fsync
    )
    adapter: Adapter = read_adapter(adapter_dir)
    fan = adapter.config.fan_in_fan_out
    shard_names, weight_map, index_meta = base_shards(base)
    files = {s: hio.open_safetensors(base / s) for s in shard_names}

    # Check every name and shape before writing anything.
    where: dict[str, str] = {}
    for s, f in files.items():
        for n in f.names():
            where[n] = s
    if weight_map is not None:
        for n, s in weight_map.items():
            if where.get(n) != s:
                _fail(f"{INDEX_NAME} maps {n!r} to {s}, but that shard does not hold it")
    lora_for: dict[str, Any] = {}
    for mod_name, mod in adapter.modules.items():
        wname = f"{mod_name}.weight"
        if wname not in where:
            _fail(f"adapter module {mod_name!r} has no weight {wname!r} in the base model")
        st, shape, _, _ = files[where[wname]].info(wname)
        if st not in _FLOAT or len(shape) != 2:
            _fail(f"base tensor {wname!r} ({st} {shape}) is not a 2-D floating-point weight")
        out_f, in_f = (shape[1], shape[0]) if fan else shape
        if mod.lora_A.shape[1] != in_f or mod.lora_B.shape[0] != out_f:
            _fail(
                f"adapter module {mod_name!r} (lora_A {list(mod.lora_A.shape)}, lora_B {list(mod.lora_B.shape)}) "
                f"does not fit base tensor {wname!r} of shape {shape}"
                + ("" if fan else "; is fan_in_fan_out missing from adapter_config.json?")
            )
        lora_for[wname] = mod
    for n, arr in adapter.saved_tensors.items():
        if n not in where:
            _fail(f"adapter replaces {n!r} (modules_to_save), which the base model does not have")
        if list(files[where[n]].info(n)[1]) != list(arr.shape):
            _fail(f"adapter tensor {n!r} has shape {list(arr.shape)}, base has {files[where[n]].info(n)[1]}")

    quant_names: set[str] = set()
    if quantize == "nf4":
        shapes = {n: list(files[s].info(n)[1]) for n, s in where.items()}
        quant_names = _linear_weights(base, {"lm_head"}, shapes)
        if out_st is None:
            out_st = "F16"

    def out_dtype(st: str) -> str:
        return out_st if (out_st and st in _FLOAT) else st

    total_bytes = sum(e - b for f in files.values() for n in f.names() for _, _, b, e in [f.info(n)])
    bar = _Progress(len(where), total_bytes, progress)
    new_map: dict[str, str] = {}
    written = 0
    with guard.writing():
        tmp = guard.temp
        for s, f in files.items():
            names = f.names()
            specs: list[tuple[str, str, list[int]]] = []
            # The bnb quant_state entry is JSON whose length depends on the values, so the
            # header needs the 4-bit results first: they are held for one shard (about 1/8
            # of its float32 size) while the unquantized tensors still stream.
            quantized: dict[str, list[tuple[str, str, np.ndarray]]] = {}
            for n in names:
                st, shape, _, _ = f.info(n)
                if n in quant_names:
                    w = to_float32(f.get(n), st)
                    if n in lora_for:
                        w = apply_lora(w, lora_for[n], fan, n)
                    quantized[n] = _quantized_entries(n, w)
                    del w
                    f.release_pages()
                    specs.extend((key, kst, list(arr.shape)) for key, kst, arr in quantized[n])
                else:
                    specs.append((n, out_dtype(st), list(shape)))
            meta = dict(f.metadata) or {"format": "pt"}
            meta.setdefault("format", "pt")
            writer = hio.SafetensorsWriter(str(tmp / s), specs, meta, durable=fsync)
            for n in names:
                st, shape, _, _ = f.info(n)
                target = out_dtype(st)  # what the header says
                src = f.get(n)
                if n in adapter.saved_tensors:
                    src = adapter.saved_tensors[n]
                    st = "BF16" if n in adapter.saved_bf16 else hio.to_numpy_bits("merge", n, src)[0]
                    if st != target and not (st in _FLOAT and target in _FLOAT):
                        _fail(f"adapter tensor {n!r} is {st}, base tensor is {target}")
                if n in quantized:
                    for key, _, arr in quantized.pop(n):
                        writer.write(key, arr.reshape(-1))
                        new_map[key] = s
                        written += arr.nbytes
                    bar.step(int(src.nbytes))
                    f.release_pages()
                    continue
                if n in lora_for or target != st:
                    w = to_float32(src, st)
                    if n in lora_for:
                        w = apply_lora(w, lora_for[n], fan, n)
                    data = _from_float32(w, target)
                else:
                    data = np.ascontiguousarray(src)
                writer.write(n, data.reshape(-1) if data.ndim else data.reshape(1))
                new_map[n] = s
                written += data.nbytes
                bar.step(int(src.nbytes))
                f.release_pages()  # keep RSS near one tensor, not one shard
            writer.finish()
            f.release_pages()
        if weight_map is not None:
            meta = dict(index_meta) if isinstance(index_meta, dict) else {}
            meta["total_size"] = written
            (tmp / INDEX_NAME).write_text(
                json.dumps({"metadata": meta, "weight_map": dict(sorted(new_map.items()))}, indent=2)
            )
        for item in base.iterdir():
            if item.is_file() and not item.name.endswith(_SKIP_SUFFIXES) and item.name not in _NOT_COPIED:
                shutil.copy2(item, tmp / item.name)
        _update_config(tmp, out_st, quantize)
        guard.commit()
    return MergeSummary(
        str(out), len(new_map), len(lora_for), len(adapter.saved_tensors), written, time.monotonic() - t0
    )


def _update_config(folder: Path, out_st: str | None, quantize: str | None) -> None:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file() or (out_st is None and quantize is None):
        return
    cfg = json.loads(cfg_path.read_text())
    if out_st is not None:
        cfg["torch_dtype"] = _TORCH_NAMES[out_st]
        cfg["dtype"] = _TORCH_NAMES[out_st]
    if quantize == "nf4":
        cfg["quantization_config"] = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": _TORCH_NAMES[out_st or "F16"],
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None,
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        }
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
