"""LoRA adapter math: forward/backward kernels, dropout masks, merge and unmerge.

Conventions follow PEFT: for a base weight ``W`` of shape ``[out, in]``,
``lora_A`` is ``[r, in]`` and ``lora_B`` is ``[out, r]``;
``y = x W^T (+ bias) + scaling * drop(x) A^T B^T``, and merging adds
``scaling * B @ A`` (transposed for ``fan_in_fan_out``, GPT-2's Conv1D, where
``W`` is stored ``[in, out]``).

The base may be a float tensor (NumPy or torch; float32, float16, bfloat16 and,
for the kernels, float64) or a 4-bit :class:`halo.QuantizedTensor`; the 4-bit
base is dequantized tile by tile inside the C++ GEMM, never as a whole.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core
from .._arrays import flatten_float, is_torch_tensor, restore
from ..backend import check_backend
from ..quant import QuantizedTensor, quantize_4bit

__all__ = [
    "MergeReport",
    "dropout_mask",
    "lora_backward",
    "lora_forward",
    "lora_scaling",
    "merge",
    "unmerge",
]


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """``alpha / r``, or rsLoRA's ``alpha / sqrt(r)``."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
        raise ValueError(f"[lora_scaling] r must be a positive integer, got {r!r}")
    return float(alpha) / (math.sqrt(r) if use_rslora else float(r))


def dropout_mask(seed: int, shape: tuple[int, ...], p: float) -> np.ndarray:
    """The mask halo's LoRA dropout applies to an input of ``shape``: 0 for a
    dropped element, ``1 / (1 - p)`` for a kept one. Element ``i`` (flat,
    row-major) is kept when ``splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15) >> 40
    >= ceil(p * 2**24)``; see docs/lora.md."""
    check_dropout("dropout_mask", p)
    count = int(math.prod(shape))
    return _core.lora.dropout_mask(check_seed("dropout_mask", seed), count, float(p)).reshape(shape)


# -- argument checks -----------------------------------------------------------------------------


def check_scaling(fn: str, scaling: Any) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"[{fn}] scaling must be a real number, got {type(scaling).__name__}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"[{fn}] scaling must be finite, got {scaling!r}")
    return float(scaling)


def check_dropout(fn: str, p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"[{fn}] dropout must be a number in [0, 1), got {p!r}")
    return float(p)


def check_seed(fn: str, seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"[{fn}] seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _as_numpy(fn: str, name: str, value: Any, dtype: type) -> np.ndarray:
    """A C-contiguous NumPy copy/view of a float array or tensor in ``dtype``."""
    if is_torch_tensor(value):
        tensor = value.detach()
        if tensor.device.type != "cpu":  # CPU kernels: no silent device-to-host copy
            raise ValueError(
                f"[{fn}] {name} is on {tensor.device}, not the CPU: this function runs halo's CPU "
                "kernels; use halo.ops (torch.ops.halo.*) for device tensors, or pass .cpu() explicitly"
            )
        if not tensor.is_floating_point():
            raise TypeError(f"[{fn}] {name} must be a float tensor, got {tensor.dtype}")
        if tensor.dtype not in (_torch().float32, _torch().float64):
            tensor = tensor.float()
        array = tensor.numpy()
    elif isinstance(value, np.ndarray):
        if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
            raise TypeError(f"[{fn}] {name} must be a float array, got dtype {value.dtype}")
        array = value
    else:
        raise TypeError(f"[{fn}] {name} must be a NumPy array or a torch tensor, got {type(value).__name__}")
    return np.ascontiguousarray(array, dtype=dtype)


def _torch():
    import torch

    return torch


def _shape(fn: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (QuantizedTensor, np.ndarray)) or is_torch_tensor(value):
        return tuple(value.shape)
    raise TypeError(
        f"[{fn}] W must be a NumPy array, a torch tensor or a QuantizedTensor, got {type(value).__name__}"
    )


def check_adapter_shapes(
    fn: str,
    base_shape: tuple[int, ...],
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    fan_in_fan_out: bool,
) -> tuple[int, int, int]:
    """(out, in, r) from the shapes, or a ValueError naming the mismatch."""
    if len(base_shape) != 2:
        raise ValueError(f"[{fn}] the base weight must be 2-D, got shape {base_shape}")
    out_features, in_features = (base_shape[1], base_shape[0]) if fan_in_fan_out else base_shape
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise ValueError(f"[{fn}] lora_A and lora_B must be 2-D, got shapes {a_shape} and {b_shape}")
    rank = a_shape[0]
    if a_shape[1] != in_features:
        raise ValueError(
            f"[{fn}] lora_A has shape {a_shape}, expected [r, {in_features}] for a base of shape {base_shape}"
            f"{' (fan_in_fan_out)' if fan_in_fan_out else ''}"
        )
    if b_shape != (out_features, rank):
        raise ValueError(f"[{fn}] lora_B has shape {b_shape}, expected {(out_features, rank)} (out, r)")
    if rank == 0 or out_features == 0 or in_features == 0:
        raise ValueError(f"[{fn}] empty dimension: base {base_shape}, lora_A {a_shape}")
    return int(out_features), int(in_features), int(rank)


# -- merge / unmerge -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeReport:
    """What re-quantizing a merged 4-bit weight cost, against the exact float merge
    ``dequantize(W) + scaling * B @ A`` computed in float32."""

    max_abs_error: float
    rel_frobenius_error: float
    codes_changed_fraction: float  # share of the 4-bit codes that differ from the original
    elements: int


def merge(W: Any, A: Any, B: Any, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """``W + scaling * B @ A`` (transposed with ``fan_in_fan_out``), as PEFT merges.

    A float ``W`` (NumPy array or torch tensor, float32/float16/bfloat16) gives a new
    array of the same kind, dtype and shape; the delta is formed in float32 as PEFT
    does on the CPU. A 4-bit :class:`QuantizedTensor` is dequantized, merged and
    re-quantized with the same settings; that returns ``(QuantizedTensor, MergeReport)``.
    """
    return _merge("merge", W, A, B, scaling, fan_in_fan_out, subtract=False)


def unmerge(W: Any, A: Any, B: Any, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """``W - scaling * B @ A``: undoes :func:`merge` (up to rounding); same kinds and returns."""
    return _merge("unmerge", W, A, B, scaling, fan_in_fan_out, subtract=True)


def _merge(fn: str, W: Any, A: Any, B: Any, scaling: Any, fan_in_fan_out: bool, subtract: bool) -> Any:
    scaling = check_scaling(fn, scaling)
    if not isinstance(W, QuantizedTensor) and not is_torch_tensor(W) and not isinstance(W, np.ndarray):
        raise TypeError(
            f"[{fn}] W must be a NumPy array, a torch tensor or a QuantizedTensor, got {type(W).__name__}"
        )
    a = _as_numpy(fn, "lora_A", A, np.float32)
    b = _as_numpy(fn, "lora_B", B, np.float32)
    out_features, in_features, _ = check_adapter_shapes(
        fn, _shape(fn, W), a.shape, b.shape, bool(fan_in_fan_out)
    )
    if isinstance(W, QuantizedTensor):
        return _merge_4bit(fn, W, a, b, scaling, bool(fan_in_fan_out), subtract, out_features, in_features)
    flat = flatten_float(fn, W)
    merged = _core.lora.merge(
        flat.data, flat.dtype, out_features, in_features, a, b, scaling, bool(fan_in_fan_out), subtract
    )
    return restore(merged, flat.dtype, flat.shape, flat.kind)


def _unpack_codes(packed: np.ndarray, n: int) -> np.ndarray:
    packed = np.ascontiguousarray(packed).reshape(-1)
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = packed >> 4  # bitsandbytes puts the first element of a pair in the high nibble
    codes[1::2] = packed & 0x0F
    return codes[:n]


def _merge_4bit(
    fn: str,
    qt: QuantizedTensor,
    a: np.ndarray,
    b: np.ndarray,
    scaling: float,
    fan_in_fan_out: bool,
    subtract: bool,
    out_features: int,
    in_features: int,
) -> tuple[QuantizedTensor, MergeReport]:
    n = qt.numel
    dequantized = _core.quant.dequantize_4bit(
        np.ascontiguousarray(qt.packed).reshape(-1),
        np.ascontiguousarray(qt.block_absmax(), dtype=np.float32),
        n,
        qt.quant_type,
        qt.blocksize,
        "float32",
        "auto",
    )
    exact = _core.lora.merge(
        dequantized, "float32", out_features, in_features, a, b, scaling, fan_in_fan_out, subtract
    )
    merged = quantize_4bit(
        exact.reshape(qt.shape),
        quant_type=qt.quant_type,
        blocksize=qt.blocksize,
        double_quant=qt.double_quant,
    )
    merged.dtype = qt.dtype
    merged.kind = qt.kind
    roundtrip = _core.quant.dequantize_4bit(
        np.ascontiguousarray(merged.packed).reshape(-1),
        np.ascontiguousarray(merged.block_absmax(), dtype=np.float32),
        n,
        merged.quant_type,
        merged.blocksize,
        "float32",
        "auto",
    )
    error = roundtrip.astype(np.float64) - exact.astype(np.float64)
    norm = float(np.linalg.norm(exact.astype(np.float64)))
    changed = np.count_nonzero(_unpack_codes(qt.packed, n) != _unpack_codes(merged.packed, n))
    report = MergeReport(
        max_abs_error=float(np.max(np.abs(error))),
        rel_frobenius_error=float(np.linalg.norm(error) / norm) if norm > 0 else float(np.linalg.norm(error)),
        codes_changed_fraction=float(changed) / n,
        elements=n,
    )
    return merged, report


# -- forward / backward on NumPy arrays ----------------------------------------------------------


@dataclass
class _Base:
    buffer: np.ndarray
    dtype: str  # float32 | float16 | bfloat16 | float64 | nf4 | fp4
    shape: tuple[int, int]
    absmax: np.ndarray | None
    blocksize: int


def describe_base(fn: str, base: Any) -> _Base:
    if isinstance(base, QuantizedTensor):
        if len(base.shape) != 2:
            raise ValueError(f"[{fn}] the base weight must be 2-D, got shape {base.shape}")
        return _Base(
            np.ascontiguousarray(base.packed).reshape(-1),
            base.quant_type,
            tuple(base.shape),
            np.ascontiguousarray(base.block_absmax(), dtype=np.float32),
            base.blocksize,
        )
    if is_torch_tensor(base) and base.dtype == _torch().float64:
        array = base.detach().cpu().contiguous().numpy()
        return _Base(array.reshape(-1), "float64", tuple(array.shape), None, 64)
    if isinstance(base, np.ndarray) and base.dtype == np.float64:
        array = np.ascontiguousarray(base)
        return _Base(array.reshape(-1), "float64", tuple(array.shape), None, 64)
    flat = flatten_float(fn, base)
    return _Base(flat.data, flat.dtype, tuple(flat.shape), None, 64)


def _kernel_args(fn: str, base: Any, A: Any, B: Any, x_dtype: type, fan_in_fan_out: bool):
    info = describe_base(fn, base)
    a = _as_numpy(fn, "lora_A", A, x_dtype)
    b = _as_numpy(fn, "lora_B", B, x_dtype)
    out_features, in_features, _ = check_adapter_shapes(fn, info.shape, a.shape, b.shape, fan_in_fan_out)
    return info, a, b, out_features, in_features


def as_rows(fn: str, x: np.ndarray, in_features: int) -> np.ndarray:
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(f"[{fn}] x has shape {x.shape}, expected [..., {in_features}]")
    return np.ascontiguousarray(x.reshape(-1, in_features))


def base_arguments(info: Any, settings: tuple) -> tuple:
    """The arguments ``_core.lora.forward`` / ``backward`` take after the adapter: the base as the
    kernel reads it, then ``settings`` = (out_features, in_features, fan_in_fan_out, scaling,
    dropout, seed, backend)."""
    out_features, in_features, fan_in_fan_out, scaling, dropout, seed, backend = settings
    return (
        *(info.buffer, info.dtype, out_features, in_features, bool(fan_in_fan_out)),
        *(scaling, dropout, seed, info.absmax, info.blocksize, backend),
    )


def lora_forward(
    x: np.ndarray,
    base: Any,
    A: Any,
    B: Any,
    scaling: float,
    dropout: float = 0.0,
    seed: int = 0,
    bias: Any = None,
    fan_in_fan_out: bool = False,
    backend: str = "auto",
) -> np.ndarray:
    """``y = x W^T (+ bias) + scaling * drop(x) A^T B^T`` for a float32 or float64
    NumPy ``x`` of shape ``[..., in]``; adapters are cast to x's dtype."""
    fn = "lora_forward"
    x_dtype = _float_kind(fn, x)
    scaling, dropout, seed = check_scaling(fn, scaling), check_dropout(fn, dropout), check_seed(fn, seed)
    check_backend(fn, backend)
    info, a, b, out_features, in_features = _kernel_args(fn, base, A, B, x_dtype, bool(fan_in_fan_out))
    rows = as_rows(fn, x, in_features)
    bias_array = None
    if bias is not None:
        bias_array = _as_numpy(fn, "bias", bias, x_dtype).reshape(-1)
        if bias_array.size != out_features:
            raise ValueError(f"[{fn}] bias has {bias_array.size} elements, expected {out_features}")
    settings = (out_features, in_features, fan_in_fan_out, scaling, dropout, seed, backend)
    y = _core.lora.forward(rows, a, b, bias_array, *base_arguments(info, settings))
    return y.reshape(*x.shape[:-1], out_features)


def lora_backward(
    grad_y: np.ndarray,
    x: np.ndarray,
    base: Any,
    A: Any,
    B: Any,
    scaling: float,
    dropout: float = 0.0,
    seed: int = 0,
    with_bias: bool = False,
    fan_in_fan_out: bool = False,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Gradients ``(grad_x, grad_A, grad_B, grad_bias or None)`` of :func:`lora_forward`
    (none for the frozen base); the dropout mask is recomputed from ``seed``."""
    fn = "lora_backward"
    x_dtype = _float_kind(fn, x)
    scaling, dropout, seed = check_scaling(fn, scaling), check_dropout(fn, dropout), check_seed(fn, seed)
    check_backend(fn, backend)
    info, a, b, out_features, in_features = _kernel_args(fn, base, A, B, x_dtype, bool(fan_in_fan_out))
    rows = as_rows(fn, x, in_features)
    if not isinstance(grad_y, np.ndarray):
        raise TypeError(f"[{fn}] grad_y must be a NumPy array like x, got {type(grad_y).__name__}")
    if grad_y.shape != (*x.shape[:-1], out_features):
        raise ValueError(f"[{fn}] grad_y has shape {grad_y.shape}, expected {(*x.shape[:-1], out_features)}")
    dy = np.ascontiguousarray(grad_y, dtype=x_dtype).reshape(-1, out_features)
    settings = (out_features, in_features, fan_in_fan_out, scaling, dropout, seed, backend)
    dx, da, db, dbias = _core.lora.backward(dy, rows, a, b, bool(with_bias), *base_arguments(info, settings))
    return dx.reshape(x.shape), da, db, dbias


def _float_kind(fn: str, x: Any) -> type:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"[{fn}] x must be a NumPy array, got {type(x).__name__}")
    if x.dtype == np.float32:
        return np.float32
    if x.dtype == np.float64:
        return np.float64
    if not x.dtype.isnative:
        raise TypeError(f"[{fn}] x is big-endian ({x.dtype.str}); convert it to native byte order")
    raise TypeError(f"[{fn}] x must be float32 or float64, got dtype {x.dtype}")
