"""ggml's own quantizer and dequantizers through ctypes, from the libggml-base
that llama-cpp-python==0.3.36 builds (the reference for halo's GGUF types).

``available()`` is False when llama-cpp-python is not installed; tests that need
it skip with that reason."""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np

GGML_IDS = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15, "BF16": 30,
}  # fmt: skip
SKIP_REASON = "llama-cpp-python==0.3.36 is not installed (optional: pip install llama-cpp-python==0.3.36)"


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_lib = None


def library_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return d if (d / "libggml-base.so").exists() else None


def available() -> bool:
    return library_dir() is not None


def _load():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(str(library_dir() / "libggml-base.so"))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_void_p,
        ]  # fmt: skip
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        _lib = lib
    return _lib


def quantize(x: np.ndarray, type: str, n_per_row: int | None = None) -> np.ndarray:
    """ggml_quantize_chunk(type, x) with no importance matrix: what llama-quantize writes."""
    lib = _load()
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n_per_row = n_per_row or x.size
    nrows = x.size // n_per_row
    out = np.zeros(lib.ggml_row_size(GGML_IDS[type], n_per_row) * nrows, dtype=np.uint8)
    lib.ggml_quantize_chunk(GGML_IDS[type], x.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, None)
    return out


def dequantize(blocks: np.ndarray, type: str, n: int) -> np.ndarray:
    lib = _load()
    traits = lib.ggml_get_type_traits(GGML_IDS[type]).contents
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits.to_float)
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    out = np.empty(n, dtype=np.float32)
    fn(blocks.ctypes.data, out.ctypes.data, n)
    return out


def load_llama(path, **kwargs):
    """llama_cpp.Llama for `path` (halo.gguf.run.load_llama: llama.cpp's AMX repacking is off)."""
    from halo.gguf.run import load_llama as load

    return load(path, **kwargs)
