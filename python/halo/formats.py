"""halo's format table, as the compiled core defines it.

One row per element or block format (``float32``, ``bfloat16``, ``nf4``,
``q4_k``...): its names in torch, NumPy, safetensors and GGUF, its block shape
and code book. Python code looks formats up here instead of keeping its own
lists, so adding a format to ``include/halo/core/format.hpp`` adds it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _core


@dataclass(frozen=True)
class FormatInfo:
    name: str
    kind: str  # "float" | "int" | "bool" | "bnb4" | "ggml_block"
    torch: str
    numpy: str
    safetensors: str
    gguf: str
    ggml_type: int
    block_elems: int  # 1 for element types, 0 for bnb4 (block size chosen per tensor)
    block_bytes: int
    bits_per_element: float
    code_book: tuple[float, ...] | None
    to_float: bool
    from_float: bool

    @property
    def itemsize(self) -> int:
        """Bytes per element of an element format (0 for block formats)."""
        return self.block_bytes if self.block_elems == 1 else 0


def _load() -> dict[str, FormatInfo]:
    rows = {}
    for row in _core.core.formats():
        book = row["code_book"]
        rows[row["name"]] = FormatInfo(**{**row, "code_book": tuple(book) if book is not None else None})
    return rows


FORMATS: dict[str, FormatInfo] = _load()

#: What halo's float kernels read and write.
KERNEL_FLOATS: tuple[str, ...] = ("float32", "float16", "bfloat16")
#: bitsandbytes 4-bit formats.
BNB4_TYPES: tuple[str, ...] = tuple(n for n, f in FORMATS.items() if f.kind == "bnb4")
_low, _high = _core.core.bnb4_blocksize_range()
#: Every valid bitsandbytes 4-bit block size.
BNB4_BLOCKSIZES: tuple[int, ...] = tuple(1 << k for k in range(_low.bit_length() - 1, _high.bit_length()))

_BY_SAFETENSORS = {f.safetensors: f for f in FORMATS.values() if f.safetensors}
_BY_TORCH = {f.torch: f for f in FORMATS.values() if f.torch}


def by_safetensors(name: str) -> FormatInfo:
    """The row whose safetensors dtype is ``name`` (``"BF16"``); ValueError otherwise."""
    try:
        return _BY_SAFETENSORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"[formats] unknown safetensors dtype {name!r}") from None


def by_torch(dtype: Any) -> FormatInfo:
    """The row of a ``torch.dtype`` (``torch.bfloat16``); TypeError when halo has none."""
    name = str(dtype).removeprefix("torch.")
    try:
        return _BY_TORCH[name]
    except KeyError:
        raise TypeError(f"[formats] halo has no format for torch dtype {dtype}") from None


def by_name(name: str) -> FormatInfo:
    """The row called ``name`` (``"float16"``, ``"nf4"``, ``"q4_k"``); ValueError otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"[formats] unknown format {name!r}; expected one of {', '.join(FORMATS)}") from None


def check_bnb4_format(fn: str, quant_type: Any, blocksize: Any) -> tuple[str, int]:
    """The one check of a bitsandbytes 4-bit (quant_type, blocksize) pair, for every front end
    (NumPy, torch ops, ``Linear4bit``, ``HaloConfig``); returns them, blocksize as an int.
    ValueError names ``fn`` and the bad value."""
    if not isinstance(quant_type, str) or quant_type not in BNB4_TYPES:
        expected = " or ".join(repr(t) for t in BNB4_TYPES)
        raise ValueError(f"[{fn}] quant_type must be {expected}, got {quant_type!r}")
    if (
        isinstance(blocksize, bool)
        or not hasattr(blocksize, "__index__")
        or int(blocksize) not in BNB4_BLOCKSIZES
    ):
        low, high = BNB4_BLOCKSIZES[0], BNB4_BLOCKSIZES[-1]
        raise ValueError(f"[{fn}] blocksize must be a power of two in {low}..{high}, got {blocksize!r}")
    return quant_type, int(blocksize)
