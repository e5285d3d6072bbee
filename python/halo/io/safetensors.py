"""safetensors files through halo's C++ reader (memory-mapped, validated header,
zero-copy NumPy views) and streaming writer (temp file, then rename).

Every malformed file raises ``ValueError`` naming the file and the problem; a FIFO,
device or folder is refused before it is opened. Views share the file's memory map:
truncating the file while views live makes reading them raise SIGBUS (as with any
mmap); ``open_safetensors(path, copy=True)`` reads the file into private memory instead.
NumPy has no bfloat16: BF16 tensors come back as ``uint16`` bit patterns with
``framework="numpy"`` and as ``torch.bfloat16`` with ``framework="torch"``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from halo._core import io as _io

from ..formats import FORMATS

__all__ = [
    "SafetensorsFile",
    "bf16_bits_to_float32",
    "float32_to_bf16_bits",
    "load_safetensors",
    "open_safetensors",
    "save_safetensors",
    "to_numpy_bits",
]

SafetensorsFile = _io.SafetensorsFile
SafetensorsWriter = _io.SafetensorsWriter


def _numpy_dtype(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and the float8 formats have no NumPy dtype
        return None


# safetensors dtype names come from the format table (halo.formats), not a list of our own.
_ELEMENT_FORMATS = [f for f in FORMATS.values() if f.safetensors and f.block_elems == 1]
_NUMPY_TO_ST = {
    dt: f.safetensors for f in _ELEMENT_FORMATS if f.numpy and (dt := _numpy_dtype(f.numpy)) is not None
}
_TORCH_TO_ST = {f"torch.{f.torch}": f.safetensors for f in _ELEMENT_FORMATS if f.torch}
_ST_TO_TORCH = {f.safetensors: f.torch for f in _ELEMENT_FORMATS if f.torch}


def open_safetensors(path: str | os.PathLike, copy: bool = False) -> SafetensorsFile:
    """Maps ``path`` and validates its header; tensors are read lazily with ``.get(name)``.

    ``copy=True`` reads the whole file into private memory, so later changes to the file
    (truncation, rewriting) cannot affect the views or raise SIGBUS."""
    return _io.open_safetensors(os.fspath(path), copy)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even as torch does (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def _torch_from_numpy(arr: np.ndarray, st_dtype: str):
    import torch

    t = torch.from_numpy(np.array(arr, copy=True))
    want = getattr(torch, _ST_TO_TORCH[st_dtype])
    if t.dtype == want:
        return t
    # NumPy has no such dtype (bfloat16, float8): the view holds the bits as an integer type.
    if t.dtype == torch.uint16:
        t = t.view(torch.int16)
    return t.view(want)


def load_safetensors(path: str | os.PathLike, framework: str = "numpy") -> dict[str, Any]:
    """All tensors of a file: read-only zero-copy NumPy views, or (``framework="torch"``) torch copies."""
    if framework not in ("numpy", "torch"):
        raise ValueError(f"[load_safetensors] framework must be 'numpy' or 'torch', got {framework!r}")
    f = open_safetensors(path)
    out: dict[str, Any] = {}
    for name in f.names():
        arr = f.get(name)
        out[name] = arr if framework == "numpy" else _torch_from_numpy(arr, f.info(name)[0])
    return out


def to_numpy_bits(fn: str, name: str, value: Any) -> tuple[str, np.ndarray]:
    """(safetensors dtype, contiguous NumPy array of the tensor's bytes) for a NumPy array or torch tensor."""
    if type(value).__module__.startswith("torch"):
        dtype = _TORCH_TO_ST.get(str(value.dtype))
        if dtype is None:
            raise TypeError(f"[{fn}] tensor {name!r} has dtype {value.dtype}, which safetensors cannot store")
        import torch

        t = value.detach().to("cpu").contiguous()
        if t.element_size() == 2 and t.dtype not in (torch.float16, torch.int16):
            t = t.view(torch.int16)
        elif t.element_size() == 1 and t.dtype not in (torch.int8, torch.uint8, torch.bool):
            t = t.view(torch.uint8)
        return dtype, np.ascontiguousarray(t.numpy())
    arr = np.asarray(value)
    dtype = _NUMPY_TO_ST.get(arr.dtype)
    if dtype is None:
        raise TypeError(f"[{fn}] tensor {name!r} has NumPy dtype {arr.dtype}, which safetensors cannot store")
    return dtype, np.ascontiguousarray(arr)


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    bf16_names: set[str] | frozenset[str] = frozenset(),
    fsync: bool = True,
) -> None:
    """Writes ``tensors`` (NumPy arrays or torch tensors) to ``path`` through a temp file,
    fsynced and renamed into place (``fsync=False`` skips the fsyncs).

    ``bf16_names`` marks NumPy ``uint16`` arrays that hold bfloat16 bits."""
    fn = "save_safetensors"
    if not isinstance(tensors, Mapping):
        raise TypeError(f"[{fn}] tensors must be a mapping of name -> array, got {type(tensors).__name__}")
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"[{fn}] metadata must map str -> str, got {k!r}: {v!r}")
    items = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"[{fn}] tensor names must be strings, got {name!r}")
        dtype, arr = to_numpy_bits(fn, name, value)
        if name in bf16_names:
            if arr.dtype != np.uint16:
                raise TypeError(f"[{fn}] {name!r} is marked bfloat16 but is {arr.dtype}, not uint16 bits")
            dtype = "BF16"
        items.append((name, dtype, arr))
    writer = _io.SafetensorsWriter(os.fspath(path), [(n, d, list(a.shape)) for n, d, a in items], meta, fsync)
    for name, _, arr in items:
        writer.write(name, arr.reshape(-1) if arr.ndim else arr.reshape(1))
    writer.finish()
