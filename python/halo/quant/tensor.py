"""Blockwise 4-bit quantization (NF4 / FP4) in bitsandbytes' layout.

``quantize_4bit`` and ``dequantize_4bit`` give the same bytes, absmax and
values as ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` on
the CPU, and ``QuantizedTensor.to_bnb_state_dict`` / ``from_bnb_state_dict``
read and write the entries a ``bnb.nn.Linear4bit`` state dict holds, so
checkpoints move both ways.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _core
from .._arrays import FLOAT_DTYPES, flatten_float, float_dtype_name, is_torch_tensor, restore
from ..backend import check_backend
from ..formats import BNB4_BLOCKSIZES as BLOCKSIZES
from ..formats import BNB4_TYPES as QUANT_TYPES
from ..formats import check_bnb4_format

NESTED_BLOCKSIZE = 256


def _check_quant_type(function: str, quant_type: Any) -> str:
    return check_bnb4_format(function, quant_type, BLOCKSIZES[0])[0]


def _check_blocksize(function: str, blocksize: Any) -> int:
    return check_bnb4_format(function, QUANT_TYPES[0], blocksize)[1]


def _mean_threads() -> int:
    # bitsandbytes takes the offset as torch's absmax.mean(), whose summation
    # order depends on torch's intra-op thread count.
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else 1


@dataclass(eq=False)
class QuantizedTensor:
    """A 4-bit tensor in bitsandbytes' layout.

    ``packed`` is uint8 of shape ``((n + 1) // 2, 1)``; ``absmax`` is float32 per
    block, or, with ``double_quant``, uint8 codes of the signed dynamic map with
    ``nested_absmax`` (float32 per 256 blocks) and ``nested_offset``.
    """

    packed: np.ndarray
    absmax: np.ndarray
    shape: tuple[int, ...]
    dtype: str
    blocksize: int
    quant_type: str
    double_quant: bool = False
    nested_absmax: np.ndarray | None = None
    nested_offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    kind: str = field(default="numpy", repr=False)

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: codes, absmax and nested statistics."""
        total = self.packed.nbytes + self.absmax.nbytes
        if self.double_quant and self.nested_absmax is not None:
            total += self.nested_absmax.nbytes + 4  # + the float32 offset
        return int(total)

    def block_absmax(self) -> np.ndarray:
        """float32 absmax per block (dequantizing the nested statistics if any).

        The decoded statistics are cached on the tensor (a read-only array) and reused
        while ``absmax``, ``nested_absmax``, ``nested_offset`` and ``nested_blocksize``
        stay the same: assign new arrays rather than writing into these in place."""
        if not self.double_quant:
            return self.absmax
        key = (self.absmax, self.nested_absmax, self.nested_offset, self.nested_blocksize)
        cached = self.__dict__.get("_absmax_cache")
        if cached is not None and _same_key(cached[0], key):
            return cached[1]
        decoded = _core.quant.double_dequantize(
            self.absmax, self.nested_absmax, float(self.nested_offset), self.nested_blocksize
        )
        decoded.flags.writeable = False
        self.__dict__["_absmax_cache"] = (key, decoded)
        return decoded

    def kernel_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(flat packed codes, contiguous float32 absmax) as the kernels take them (cached)."""
        cached = self.__dict__.get("_kernel_cache")
        if cached is not None:  # the hot path of every matmul: identity checks only
            k = cached[0]
            if (
                k[0] is self.packed
                and k[1] is self.absmax
                and k[2] is self.nested_absmax
                and k[3] == self.nested_offset
                and k[4] == self.nested_blocksize
            ):
                return cached[1]
        key = (self.packed, self.absmax, self.nested_absmax, self.nested_offset, self.nested_blocksize)
        arrays = (
            np.ascontiguousarray(self.packed).reshape(-1),
            np.ascontiguousarray(self.block_absmax(), dtype=np.float32),
        )
        self.__dict__["_kernel_cache"] = (key, arrays)
        return arrays

    def _device_arrays(self, device: Any) -> tuple[Any, Any]:
        """The kernel arrays as torch tensors on a CUDA ``device`` (cached per device)."""
        import torch

        packed, absmax = self.kernel_arrays()
        cache = self.__dict__.setdefault("_device_cache", {})
        entry = cache.get(str(device))
        if entry is not None and entry[0][0] is packed and entry[0][1] is absmax:
            return entry[1]
        tensors = (torch.from_numpy(packed).to(device), torch.from_numpy(absmax).to(device))
        cache[str(device)] = ((packed, absmax), tensors)
        return tensors

    def dequantize(self, dtype: str | None = None, backend: str = "auto") -> Any:
        return dequantize_4bit(self, dtype=dtype, backend=backend)

    # -- bitsandbytes state dict -------------------------------------------------------------------
    def quant_state_json(self) -> dict:
        state: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": self.dtype,
            "shape": list(self.shape),
        }
        if self.double_quant:
            state["nested_blocksize"] = self.nested_blocksize
            state["nested_dtype"] = "float32"
            state["nested_offset"] = float(np.float32(self.nested_offset))
        return state

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict:
        """The entries a ``bnb.nn.Linear4bit`` state dict holds for parameter ``prefix``
        (torch tensors with bitsandbytes' keys, dtypes, shapes and bytes)."""
        import torch

        out = {prefix: torch.from_numpy(self.packed.copy())}
        out[f"{prefix}.absmax"] = torch.from_numpy(self.absmax.copy())
        out[f"{prefix}.quant_map"] = torch.from_numpy(_core.quant.code_book(self.quant_type))
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = torch.from_numpy(self.nested_absmax.copy())
            out[f"{prefix}.nested_quant_map"] = torch.from_numpy(_core.quant.dynamic_map())
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.frombuffer(
            bytearray(blob), dtype=torch.uint8
        )
        return out

    @classmethod
    def from_bnb_state_dict(cls, state_dict: Mapping[str, Any], prefix: str = "weight") -> QuantizedTensor:
        """Reads the entries ``to_bnb_state_dict`` (or bitsandbytes) wrote for ``prefix``."""
        fn = "QuantizedTensor.from_bnb_state_dict"
        state_keys = [k for k in state_dict if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if len(state_keys) != 1:
            raise ValueError(
                f"[{fn}] expected exactly one key '{prefix}.quant_state.bitsandbytes__<nf4|fp4>', found {state_keys}"
            )
        for key in (prefix, f"{prefix}.absmax"):
            if key not in state_dict:
                raise ValueError(f"[{fn}] missing key '{key}'")
        raw = _as_numpy(state_dict[state_keys[0]])
        try:
            meta = json.loads(bytes(raw.astype(np.uint8).tobytes()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"[{fn}] '{state_keys[0]}' does not hold valid UTF-8 JSON: {error}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"[{fn}] '{state_keys[0]}' must hold a JSON object, got {type(meta).__name__}")
        for key in ("quant_type", "blocksize", "dtype", "shape"):
            if key not in meta:
                raise ValueError(f"[{fn}] quant state JSON lacks '{key}'")
        quant_type = _check_quant_type(fn, meta["quant_type"])
        if state_keys[0].rsplit("__", 1)[1] != quant_type:
            raise ValueError(f"[{fn}] key {state_keys[0]!r} disagrees with quant_type {quant_type!r}")
        blocksize = _check_blocksize(fn, meta["blocksize"])
        dtype = str(meta["dtype"]).replace("torch.", "")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"[{fn}] unsupported dtype {meta['dtype']!r}")
        shape = meta["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"[{fn}] shape must be a list of non-negative integers, got {shape!r}")
        n = int(math.prod(shape))
        if n == 0:
            raise ValueError(f"[{fn}] shape {shape} holds no elements")
        packed = _as_numpy(state_dict[prefix])
        if packed.dtype != np.uint8:
            packed = np.ascontiguousarray(packed).view(np.uint8)
        packed = np.ascontiguousarray(packed).reshape(-1, 1)
        if packed.shape[0] != (n + 1) // 2:
            raise ValueError(
                f"[{fn}] '{prefix}' holds {packed.shape[0]} bytes, expected {(n + 1) // 2} for shape {shape}"
            )
        blocks = -(-n // blocksize)
        absmax = np.ascontiguousarray(_as_numpy(state_dict[f"{prefix}.absmax"])).reshape(-1)
        if absmax.shape[0] != blocks:
            raise ValueError(f"[{fn}] '{prefix}.absmax' holds {absmax.shape[0]} values, expected {blocks}")
        qmap_key = f"{prefix}.quant_map"
        if qmap_key in state_dict:
            qmap = _as_numpy(state_dict[qmap_key]).astype(np.float32).reshape(-1)
            if not np.array_equal(qmap, _core.quant.code_book(quant_type)):
                raise ValueError(f"[{fn}] '{qmap_key}' is not the {quant_type} code book")
        kind = "torch" if is_torch_tensor(state_dict[prefix]) else "numpy"
        nested = "nested_offset" in meta or f"{prefix}.nested_absmax" in state_dict
        if not nested:
            if absmax.dtype != np.float32:
                raise ValueError(f"[{fn}] '{prefix}.absmax' must be float32, got {absmax.dtype}")
            return cls(packed, absmax, tuple(shape), dtype, blocksize, quant_type, kind=kind)
        for key in (f"{prefix}.nested_absmax",):
            if key not in state_dict:
                raise ValueError(f"[{fn}] missing key '{key}'")
        if "nested_offset" not in meta:
            raise ValueError(f"[{fn}] quant state JSON lacks 'nested_offset'")
        if absmax.dtype != np.uint8:
            raise ValueError(f"[{fn}] nested '{prefix}.absmax' must be uint8 codes, got {absmax.dtype}")
        nested_blocksize = meta.get("nested_blocksize", NESTED_BLOCKSIZE)
        if (
            isinstance(nested_blocksize, bool)
            or not isinstance(nested_blocksize, int)
            or not 0 < nested_blocksize < 2**31
        ):
            raise ValueError(
                f"[{fn}] quant state 'nested_blocksize' must be a positive integer, got {nested_blocksize!r}"
            )
        nested_offset = meta["nested_offset"]
        finite = isinstance(nested_offset, (int, float)) and not isinstance(nested_offset, bool)
        try:
            with np.errstate(over="ignore"):
                finite = finite and bool(np.isfinite(np.float32(float(nested_offset))))
        except OverflowError:  # an integer beyond double's range
            finite = False
        if not finite:
            raise ValueError(
                f"[{fn}] quant state 'nested_offset' must be a finite float32 number, got {nested_offset!r}"
            )
        nested_absmax = np.ascontiguousarray(_as_numpy(state_dict[f"{prefix}.nested_absmax"])).reshape(-1)
        if nested_absmax.dtype != np.float32 or nested_absmax.shape[0] != -(-blocks // nested_blocksize):
            raise ValueError(
                f"[{fn}] '{prefix}.nested_absmax' must be float32[{-(-blocks // nested_blocksize)}], "
                f"got {nested_absmax.dtype}[{nested_absmax.shape[0]}]"
            )
        nested_map_key = f"{prefix}.nested_quant_map"
        if nested_map_key in state_dict:
            nested_map = _as_numpy(state_dict[nested_map_key]).astype(np.float32).reshape(-1)
            if not np.array_equal(nested_map, _core.quant.dynamic_map()):
                raise ValueError(f"[{fn}] '{nested_map_key}' is not the signed dynamic map")
        return cls(
            packed,
            absmax,
            tuple(shape),
            dtype,
            blocksize,
            quant_type,
            double_quant=True,
            nested_absmax=nested_absmax,
            nested_offset=float(np.float32(nested_offset)),
            nested_blocksize=nested_blocksize,
            kind=kind,
        )


def _same_key(a: tuple, b: tuple) -> bool:
    """Cache keys: arrays compare by identity, scalars by value."""
    return len(a) == len(b) and all(
        (x is y) if isinstance(x, np.ndarray) or isinstance(y, np.ndarray) else x == y for x, y in zip(a, b)
    )


def _as_numpy(value: Any) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            raise ValueError("bfloat16 tensors are not valid quantization state")
        return value.contiguous().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"expected a tensor or array in the state dict, got {type(value).__name__}")


def quantize_4bit(
    w: Any,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    backend: str = "auto",
) -> QuantizedTensor:
    """Quantizes a float tensor (NumPy array or CPU torch tensor, any layout) to 4 bits."""
    fn = "quantize_4bit"
    _check_quant_type(fn, quant_type)
    blocksize = _check_blocksize(fn, blocksize)
    check_backend(fn, backend)
    flat = flatten_float(fn, w)
    if flat.data.size == 0:
        raise ValueError(f"[{fn}] the tensor is empty (shape {flat.shape})")
    packed, absmax = _core.quant.quantize_4bit(flat.data, flat.dtype, quant_type, blocksize, backend)
    qt = QuantizedTensor(
        packed.reshape(-1, 1), absmax, flat.shape, flat.dtype, blocksize, quant_type, kind=flat.kind
    )
    if double_quant:
        codes, nested_absmax, offset = _core.quant.double_quantize(
            absmax, NESTED_BLOCKSIZE, None, _mean_threads()
        )
        qt.absmax = codes
        qt.double_quant = True
        qt.nested_absmax = nested_absmax
        qt.nested_offset = float(offset)
    return qt


def dequantize_4bit(
    qt: QuantizedTensor, dtype: str | None = None, backend: str = "auto", out: Any = None
) -> Any:
    """Dequantizes to ``dtype`` (default: the original dtype), returning the kind of
    array the quantizer was given (NumPy array or torch tensor).

    ``out`` (optional): a C-contiguous NumPy array or CPU torch tensor of that dtype
    and element count to write into (no allocation); it is returned.
    """
    fn = "dequantize_4bit"
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"[{fn}] expected a QuantizedTensor, got {type(qt).__name__}")
    check_backend(fn, backend)
    if out is not None and not (is_torch_tensor(out) or isinstance(out, np.ndarray)):
        raise TypeError(f"[{fn}] out must be a NumPy array or a torch tensor, got {type(out).__name__}")
    if out is not None and dtype is None:
        dtype = out.dtype
    dtype = float_dtype_name(fn, dtype if dtype is not None else qt.dtype)
    packed = np.ascontiguousarray(qt.packed).reshape(-1)
    absmax = np.ascontiguousarray(qt.block_absmax(), dtype=np.float32)
    args = (packed, absmax, qt.numel, qt.quant_type, qt.blocksize, dtype, backend)
    if out is not None:
        _core.quant.dequantize_4bit(*args, writable_flat(fn, out, dtype, qt.numel))
        return out
    flat = _core.quant.dequantize_4bit(*args)
    return restore(flat, dtype, qt.shape, qt.kind)


def writable_flat(function: str, out: Any, dtype: str, numel: int) -> np.ndarray:
    if is_torch_tensor(out):
        import torch

        if out.device.type != "cpu" or not out.is_contiguous() or out.requires_grad:
            raise ValueError(f"[{function}] out must be a contiguous CPU tensor without grad")
        if str(out.dtype).replace("torch.", "") != dtype:
            raise TypeError(f"[{function}] out has dtype {out.dtype}, expected {dtype}")
        flat = out.reshape(-1)
        array = flat.view(torch.int16).numpy() if dtype == "bfloat16" else flat.numpy()
    elif isinstance(out, np.ndarray):
        if not out.dtype.isnative:
            raise TypeError(f"[{function}] out is big-endian ({out.dtype.str}); give a native-order array")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"[{function}] out must be a writeable C-contiguous array")
        if out.dtype.name != dtype:
            raise TypeError(f"[{function}] out has dtype {out.dtype}, expected {dtype}")
        array = out.reshape(-1)
    else:
        raise TypeError(f"[{function}] out must be a NumPy array or a torch tensor, got {type(out).__name__}")
    if array.size != numel:
        raise ValueError(f"[{function}] out holds {array.size} elements, expected {numel}")
    return array


# -- matrix products with a 4-bit weight ------------------------------------------------------------
