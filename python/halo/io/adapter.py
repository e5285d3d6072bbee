"""PEFT LoRA adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reads folders PEFT wrote and writes folders ``PeftModel.from_pretrained`` loads.
Per-module rank/alpha come from ``rank_pattern``/``alpha_pattern`` with PEFT's
matching rule (a pattern matches a module name that ends with it after a dot);
``use_rslora`` gives ``alpha/sqrt(r)``. DoRA magnitude vectors are kept per module.
A pickled ``adapter_model.bin`` is read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import safetensors as hio

__all__ = ["Adapter", "AdapterConfig", "LoraModule", "read_adapter", "write_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # PEFT's get_pattern_key: the first pattern that matches the end of the name after a dot.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass
class AdapterConfig:
    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    use_dora: bool = False
    target_modules: Any = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    raw: dict[str, Any] = field(default_factory=dict)  # every field, written back unchanged

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "adapter_config.json") -> AdapterConfig:
        """Checks every field merging depends on (as PEFT would refuse it, but always as one
        ``ValueError`` naming ``source`` and the field)."""

        def bad(field_name: str, what: str, value: Any) -> ValueError:
            return ValueError(f"[read_adapter] {source}: {field_name} {what}, got {value!r}")

        if not isinstance(d, dict):
            raise ValueError(f"[read_adapter] {source}: expected a JSON object")
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise bad("peft_type", "is not supported (only LORA)", peft_type)
        r = d.get("r", 8)
        if not _is_int(r) or r <= 0:
            raise bad("r", "must be a positive integer", r)
        alpha = d.get("lora_alpha", 8)
        if not _is_finite_number(alpha):
            raise bad("lora_alpha", "must be a finite number", alpha)
        flags = {}
        for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
            value = d.get(name)
            if value is not None and not isinstance(value, bool):
                # PEFT would take the string "false" as true.
                raise bad(name, "must be true or false", value)
            flags[name] = bool(value)
        patterns = {}
        for name, check, what in (
            ("rank_pattern", lambda v: _is_int(v) and v > 0, "must be a positive integer"),
            ("alpha_pattern", _is_finite_number, "must be a finite number"),
        ):
            pattern = d.get(name) or {}
            if not isinstance(pattern, dict):
                raise bad(name, "must be an object", pattern)
            for key, value in pattern.items():
                try:
                    re.compile(rf"(.*\.)?({key})$")
                except re.error as exc:
                    raise bad(
                        f"{name} key {key!r}", f"is not a valid regular expression ({exc})", key
                    ) from None
                if not check(value):
                    raise bad(f"{name}[{key!r}]", what, value)
            patterns[name] = dict(pattern)
        return cls(
            r=r,
            lora_alpha=alpha,
            target_modules=d.get("target_modules"),
            rank_pattern=patterns["rank_pattern"],
            alpha_pattern=patterns["alpha_pattern"],
            modules_to_save=d.get("modules_to_save"),
            raw=dict(d),
            **flags,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.raw)
        d.setdefault("peft_type", "LORA")
        d.update(
            r=self.r,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            fan_in_fan_out=self.fan_in_fan_out,
            use_dora=self.use_dora,
            target_modules=sorted(self.target_modules)
            if isinstance(self.target_modules, (set, frozenset))
            else self.target_modules,
            rank_pattern=self.rank_pattern,
            alpha_pattern=self.alpha_pattern,
            modules_to_save=self.modules_to_save,
        )
        return d

    def rank_for(self, module: str) -> int:
        key = _pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module: str) -> float:
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def field_for(self, kind: str, module: str) -> str:
        """The config field that sets ``module``'s rank (kind "r") or alpha (kind "alpha"), for messages."""
        patterns, default = (self.rank_pattern, "r") if kind == "r" else (self.alpha_pattern, "lora_alpha")
        key = _pattern_key(patterns, module)
        return default if key is None else f"{'rank_pattern' if kind == 'r' else 'alpha_pattern'}[{key!r}]"


@dataclass
class LoraModule:
    """One adapted module (name relative to the base model, e.g. ``model.layers.0.self_attn.q_proj``)."""

    name: str
    lora_A: np.ndarray  # [r, in], float32
    lora_B: np.ndarray  # [out, r], float32
    scaling: float
    magnitude: np.ndarray | None = None  # DoRA magnitude [out], float32


@dataclass
class Adapter:
    config: AdapterConfig
    modules: dict[str, LoraModule]
    # Whole tensors that replace base tensors (modules_to_save), by base tensor name.
    saved_tensors: dict[str, np.ndarray]
    saved_bf16: set[str] = field(default_factory=set)


def _float32(fn: str, key: str, arr: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":
        return hio.bf16_bits_to_float32(arr)
    if st_dtype in ("F32", "F16", "F64"):
        return np.asarray(arr, dtype=np.float32)
    raise ValueError(
        f"[{fn}] adapter tensor {key!r} has dtype {st_dtype}; LoRA weights must be floating point"
    )


def _load_tensors(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    fn = "read_adapter"
    st = folder / WEIGHTS_NAME
    if st.is_file():
        f = hio.open_safetensors(st)
        return {n: (f.info(n)[0], f.get(n)) for n in f.names()}
    pkl = folder / PICKLE_NAME
    if pkl.is_file():
        import torch

        try:
            sd = torch.load(pkl, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"[{fn}] {pkl} could not be read safely with torch.load(weights_only=True) ({exc.__class__.__name__}); "
                "convert it to safetensors in a trusted environment, e.g. "
                "safetensors.torch.save_file(torch.load(path), 'adapter_model.safetensors')"
            ) from None
        if not isinstance(sd, dict):
            raise ValueError(f"[{fn}] {pkl} does not hold a state dict")
        out = {}
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"[{fn}] {pkl}: entry {k!r} is not a tensor")
            dt, arr = hio.to_numpy_bits(fn, k, v)
            out[k] = (dt, arr)
        return out
    raise ValueError(f"[{fn}] {folder} has neither {WEIGHTS_NAME} nor {PICKLE_NAME}")


def read_adapter(folder: str | os.PathLike) -> Adapter:
    """Reads a PEFT LoRA adapter folder; ValueError on anything missing or inconsistent."""
    fn = "read_adapter"
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise ValueError(f"[{fn}] {folder} has no {CONFIG_NAME}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"[{fn}] {cfg_path} is not valid JSON: {exc}") from None
    config = AdapterConfig.from_dict(raw, str(cfg_path))
    tensors = _load_tensors(folder)

    parts: dict[str, dict[str, tuple[str, str, np.ndarray]]] = {}
    saved: dict[str, np.ndarray] = {}
    saved_bf16: set[str] = set()
    for key, (dt, arr) in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"[{fn}] adapter tensor {key!r} does not start with {PREFIX!r}")
        rest = key[len(PREFIX) :]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_magnitude_vector)(?:\.weight)?", rest)
        if m:
            module = m.group(1) or m.group(3)
            kind = m.group(2) or m.group(4)
            parts.setdefault(module, {})[kind] = (key, dt, arr)
            continue
        if re.search(r"\.lora_embedding_[AB]$|\.lora_[AB]\.", rest) or ".lora_" in rest:
            raise ValueError(f"[{fn}] adapter tensor {key!r}: only LoRA on Linear/Conv1D layers is supported")
        base_name = rest.replace(".modules_to_save.", ".")
        saved[base_name] = arr
        if dt == "BF16":
            saved_bf16.add(base_name)

    modules = {}
    for module, p in parts.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise ValueError(f"[{fn}] module {module!r} lacks lora_A or lora_B")
        A = _float32(fn, p["lora_A"][0], p["lora_A"][2], p["lora_A"][1])
        B = _float32(fn, p["lora_B"][0], p["lora_B"][2], p["lora_B"][1])
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"[{fn}] module {module!r}: lora_A {A.shape} and lora_B {B.shape} are not [r, in] and [out, r]"
            )
        rank = config.rank_for(module)
        if A.shape[0] != rank:
            raise ValueError(
                f"[{fn}] {cfg_path}: {config.field_for('r', module)} is {rank} but module {module!r} has "
                f"rank {A.shape[0]} (lora_A {list(A.shape)}, lora_B {list(B.shape)})"
            )
        scaling = config.scaling_for(module)
        with np.errstate(over="ignore"):
            scaling_f32 = np.float32(scaling)
        if not np.isfinite(scaling_f32):
            # Finite in double but not in float32 (e.g. lora_alpha 1e40): the merged weights would be inf/NaN.
            raise ValueError(
                f"[{fn}] {cfg_path}: {config.field_for('alpha', module)} = {config.alpha_for(module)!r} gives "
                f"module {module!r} a scaling of {scaling:g}, beyond float32's range"
            )
        mag = None
        if "lora_magnitude_vector" in p:
            k, dt, arr = p["lora_magnitude_vector"]
            mag = _float32(fn, k, arr, dt).reshape(-1)
            if mag.shape[0] != B.shape[0]:
                raise ValueError(
                    f"[{fn}] module {module!r}: magnitude has {mag.shape[0]} entries, lora_B has {B.shape[0]} rows"
                )
        modules[module] = LoraModule(module, A, B, scaling, mag)
    return Adapter(config, modules, saved, saved_bf16)


def write_adapter(folder: str | os.PathLike, adapter: Adapter) -> None:
    """Writes ``adapter`` as a PEFT folder (float32 LoRA weights, ``{"format": "pt"}`` metadata)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name, m in adapter.modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(m.lora_A, dtype=np.float32)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(m.lora_B, dtype=np.float32)
        if m.magnitude is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(
                m.magnitude, dtype=np.float32
            )
    bf16 = set()
    for base_name, arr in adapter.saved_tensors.items():
        key = f"{PREFIX}{base_name}"  # PEFT saves modules_to_save copies under the base name
        tensors[key] = arr
        if base_name in adapter.saved_bf16:
            bf16.add(key)
    hio.save_safetensors(folder / WEIGHTS_NAME, tensors, {"format": "pt"}, bf16_names=bf16)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".adapter_config.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(adapter.config.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, folder / CONFIG_NAME)
