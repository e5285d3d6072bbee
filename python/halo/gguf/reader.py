"""GGUF files (llama.cpp's model format) through halo's C++ reader and writer,
and ggml's tensor types as quantize / dequantize functions.

``read(path)`` maps and validates a file (ValueError naming the file and the
problem for anything truncated, oversized, misaligned or of an unknown type)
and gives its metadata as Python values and its tensors as NumPy arrays.
``quantize`` gives the bytes llama.cpp's own reference quantizer writes (no
importance matrix) for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K,
Q6_K and Q8_K, and ggml's F16 / BF16 rounding. Model export and import live in
``halo.gguf.export`` and ``halo.gguf.importer``.

Names: GGUF strings are bytes. A key or tensor name that is not UTF-8 comes back as a
``str`` with surrogate escapes (``errors="surrogateescape"``), and that same ``str``
reads the tensor back (``raw``, ``numpy``) and writes it (``GGUFWriter``) unchanged.

Shapes: GGUF stores dimensions innermost first (``dims``); ``shape`` is the
same tensor the way torch and NumPy write it (``tuple(reversed(dims))``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from halo._core import gguf as _g

__all__ = [
    "GGUFFile",
    "GGUFTensor",
    "GGUFWriter",
    "block_size",
    "dequantize",
    "quantize",
    "read",
    "type_info",
]


def _name(name: str) -> bytes:
    """A tensor name as the C++ side takes it: its bytes (surrogate escapes back to raw bytes)."""
    if not isinstance(name, str):
        raise TypeError(f"[gguf] a tensor name must be a str, got {type(name).__name__}")
    return name.encode("utf-8", "surrogateescape")


class GGUFWriter(_g.GgufWriter):
    """Streams tensors into a GGUF v3 file (temp file, then rename); names may hold surrogate escapes."""

    def __init__(self, path: str | os.PathLike, metadata: list, tensors: list, alignment: int = 32):
        specs = [(_name(n), list(dims), t) for n, dims, t in tensors]
        super().__init__(os.fspath(path), metadata, specs, alignment)

    def write(self, name: str, data: Any) -> None:
        super().write(_name(name), data)


@dataclass(frozen=True)
class TypeInfo:
    id: int
    name: str
    block: int  # elements per block
    bytes: int  # bytes per block
    convertible: bool  # halo quantizes and dequantizes it


def type_info(name: str | int) -> TypeInfo:
    """Layout of a GGUF tensor type by name ("Q4_K", "q4_k", "F16") or ggml id."""
    if isinstance(name, int) and not isinstance(name, bool):
        info = _g.type_info_by_id(name)
        if info is None:
            raise ValueError(f"[gguf.type_info] unknown ggml type id {name}")
        return TypeInfo(*info)
    if not isinstance(name, str):
        raise TypeError(f"[gguf.type_info] type must be a name or an id, got {type(name).__name__}")
    return TypeInfo(*_g.type_info(name))


def block_size(name: str) -> int:
    return type_info(name).block


def _as_float32(fn: str, x: Any) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        x = x.detach().to("cpu").float().contiguous().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"[{fn}] expected floating-point data, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def quantize(x: Any, type: str, backend: str = "auto") -> np.ndarray:
    """Rows of ``x`` (NumPy array or torch tensor, any float dtype) as GGUF ``type``.

    The last dimension must be a multiple of the type's block size (32 or 256).
    Returns uint8 of shape ``x.shape[:-1] + (row bytes,)``: the bytes ggml's
    reference quantizer gives for the same float32 values."""
    fn = "gguf.quantize"
    arr = _as_float32(fn, x)
    info = type_info(type)
    if not info.convertible:
        raise ValueError(f"[{fn}] type {info.name} cannot be quantized by halo")
    if arr.ndim == 0 or arr.shape[-1] % info.block:
        raise ValueError(
            f"[{fn}] the last dimension ({arr.shape[-1] if arr.ndim else 'scalar'}) must be a multiple of "
            f"{info.name}'s block size {info.block}"
        )
    blocks = _g.quantize(arr.reshape(-1), info.name, backend)
    return blocks.reshape(arr.shape[:-1] + (arr.shape[-1] // info.block * info.bytes,))


def dequantize(blocks: Any, type: str, shape: Sequence[int], backend: str = "auto") -> np.ndarray:
    """GGUF ``type`` bytes -> float32 array of ``shape`` (torch order)."""
    fn = "gguf.dequantize"
    info = type_info(type)
    if not info.convertible:
        raise ValueError(f"[{fn}] type {info.name} cannot be dequantized by halo")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"[{fn}] shape {shape} has a negative dimension")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    data = np.ascontiguousarray(np.asarray(blocks)).view(np.uint8).reshape(-1)
    return _g.dequantize(data, info.name, n, backend).reshape(shape)


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is contiguous
    type: str
    offset: int  # into the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))

    @property
    def numel(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64))


class GGUFFile:
    """A validated, memory-mapped GGUF file (see :func:`read`)."""

    def __init__(self, path: str | os.PathLike):
        self._f = _g.open_gguf(os.fspath(path))
        self.path = self._f.path
        self.version: int = self._f.version
        self.alignment: int = self._f.alignment
        self.metadata: dict[str, Any] = {}
        self.types: dict[str, str] = {}  # key -> "uint32", "string", "array[int32]", ...
        for key, typ, value in self._f.metadata():
            self.metadata[key] = value
            self.types[key] = typ
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, typ, offset, nbytes in self._f.tensors():
            self.tensors[name] = GGUFTensor(name, tuple(dims), typ, offset, nbytes)

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"

    def __iter__(self) -> Iterator[GGUFTensor]:
        return iter(self.tensors.values())

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def _tensor(self, name: str) -> GGUFTensor:
        if name not in self.tensors:
            raise KeyError(f"[GGUFFile] {self.path} has no tensor {name!r}")
        return self.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a read-only zero-copy uint8 view of the mapping."""
        self._tensor(name)
        return self._f.tensor_data(_name(name))

    def numpy(self, name: str, backend: str = "auto") -> np.ndarray:
        """The tensor as float32 of its torch-order shape (dequantized when quantized).

        F32 tensors come back as a zero-copy read-only view; integer tensors as
        their own dtype."""
        t = self._tensor(name)
        raw = self._f.tensor_data(_name(name))
        ints = {"I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "F64": np.float64}
        if t.type == "F32":
            return raw.view(np.float32).reshape(t.shape)
        if t.type in ints:
            return raw.view(ints[t.type]).reshape(t.shape)
        return self._f.to_float(_name(name), backend).reshape(t.shape)

    def release_pages(self) -> None:
        """Drops this process's resident pages of the mapping (keeps RSS near one tensor while streaming)."""
        self._f.release_pages()


def read(path: str | os.PathLike) -> GGUFFile:
    """Maps and validates a GGUF file; ValueError naming the file and the problem."""
    return GGUFFile(path)
