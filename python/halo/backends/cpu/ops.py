"""CPU kernels of ``torch.ops.halo.*`` (the operators are defined in :mod:`halo.ops`).

Tensors cross to halo's C++ kernels without copies: the matmuls' activations and results as
pointers (``data_ptr``, contiguous tensors the op layer has checked), a weight's codes and scales
as NumPy views kept on the weight between calls (``_cached``), anything else as NumPy views taken
through DLPack; bfloat16 crosses as its uint16 bits. The matmuls run halo's fused 4-bit GEMM/GEMV
(halo/quant/matmul4.hpp: the codes are decoded inside the kernel, never as a whole W).
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import torch
from torch import Tensor

from ... import _core
from ... import ops as _ops
from ...backend import native_bf16_features
from .. import common


def _numpy(t: Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor through DLPack: no copy and, unlike ``Tensor.numpy()``, the
    tensor's storage stays resizable (FSDP2 frees a gathered parameter by resizing its storage
    to 0, which fails on storage that ``numpy()`` has pinned)."""
    return np.from_dlpack(t)


def numpy_bits(t: Tensor) -> np.ndarray:
    """A flat NumPy view of a contiguous CPU tensor (bfloat16 as its uint16 bits)."""
    flat = t.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return _numpy(flat.view(torch.int16)).view(np.uint16)
    return _numpy(flat)


def _cached(t: Tensor, slot: str, extra: tuple, make) -> np.ndarray:
    """``make()`` once per state of ``t``: kept on the tensor under ``slot``, keyed by its storage
    address and version counter (and ``extra``), so an in-place change or a re-allocated storage
    (FSDP2 frees and re-gathers) makes it again. Every forward, recomputed forward and backward of a
    step reads the same frozen weight, and taking a view through DLPack costs microseconds.
    ``make`` must not return an array that refers to ``t`` (a cycle would keep freed weights alive
    until the garbage collector runs): views come from :func:`_raw_view`."""
    try:
        key = (t.data_ptr(), t._version, t.numel(), *extra)
    except RuntimeError:  # inference tensors keep no version counter: make it every time
        return make()
    cached = t.__dict__.get(slot)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = make()
    setattr(t, slot, (key, value))
    return value


def _raw_view(t: Tensor, dtype: type) -> np.ndarray:
    """A flat NumPy view of a contiguous CPU tensor's memory that holds no reference to the
    tensor (only :func:`_cached` uses it, keyed by the storage address it reads)."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return np.empty(0, dtype)
    if t.untyped_storage().nbytes() < t.storage_offset() * t.element_size() + nbytes:  # freed (FSDP2)
        raise ValueError(
            f"[halo] a {tuple(t.shape)} {t.dtype} weight tensor has no memory (its storage was freed)"
        )
    return np.frombuffer((ctypes.c_char * nbytes).from_address(t.data_ptr()), dtype=dtype)


def _codes(packed: Tensor) -> np.ndarray:
    """The flat uint8 codes of a weight as the kernels take them."""
    if not packed.is_contiguous():
        return _numpy(packed.contiguous()).reshape(-1)
    return _cached(packed, "_halo_codes", (), lambda: _raw_view(packed, np.uint8))


def _scales(absmax: Tensor, nested_absmax: Tensor | None, nested_offset: float) -> np.ndarray:
    """The float32 per-block scales of a weight. With double quantization they are decoded once
    and kept on ``absmax`` (the forward, the recomputed forward and the backward of a step all
    ask for them)."""
    if nested_absmax is None:
        if not absmax.is_contiguous():
            return np.ascontiguousarray(_numpy(absmax.contiguous()), dtype=np.float32)
        return _cached(absmax, "_halo_scales", (), lambda: _raw_view(absmax, np.float32))

    def decode() -> np.ndarray:
        return np.ascontiguousarray(
            _core.quant.double_dequantize(
                _numpy(absmax.contiguous()),
                _numpy(nested_absmax.contiguous()),
                float(nested_offset),
                _ops.NESTED_BLOCKSIZE,
            ),
            dtype=np.float32,
        )

    try:
        nested_key = (nested_absmax.data_ptr(), nested_absmax._version, float(nested_offset))
    except RuntimeError:
        return decode()
    return _cached(absmax, "_halo_scales", nested_key, decode)


# bfloat16 x with at least this many rows, on a CPU that computes bfloat16 natively: W is decoded to
# bfloat16 (halo's dequantize kernel, into a buffer of the call) and multiplied by torch's GEMM (oneDNN's
# AMX or AVX512-BF16 kernels). With AMX that beats halo's fused AMX tiles from 384 rows
# (benchmarks/quant/bench_matmul4.py, README); without AMX halo's fused GEMM computes in float32, and
# the decoded copy + oneDNN's vdpbf16ps GEMM wins from 64 rows (1.4-2.6x at 64-512 rows on SmolLM2's
# and 4096^2 shapes, forward and transposed, a 2-core Zen 5; at 17-32 rows neither wins throughout).
# Fewer rows, other dtypes and other CPUs keep the fused kernels, which never hold W whole.
DENSE_ROWS = 384
DENSE_ROWS_AVX512_BF16 = 64
DENSE_MAX_ELEMENTS = 1 << 24  # the decoded copy stays under 32 MiB
_DENSE_FROM: dict[tuple, int | None] = {}
_SCRATCH = (
    threading.local()
)  # each thread's bfloat16 buffer for W (reused: fresh pages cost more than the GEMM)


def _dense_from() -> int | None:
    """The rows from which backend "auto" takes the dense path here (see DENSE_ROWS), or None
    where the CPU has no native bfloat16 (HALO_BACKEND / HALO_DISABLE_AMX / HALO_DISABLE_AVX512_BF16
    respected), asked of the registry once per setting of those variables."""
    key = tuple(os.environ.get(k) for k in ("HALO_BACKEND", "HALO_DISABLE_AMX", "HALO_DISABLE_AVX512_BF16"))
    if key not in _DENSE_FROM:
        features = native_bf16_features()
        _DENSE_FROM[key] = (
            DENSE_ROWS
            if "amx_bf16" in features
            else DENSE_ROWS_AVX512_BF16
            if "avx512_bf16" in features
            else None
        )
    return _DENSE_FROM[key]


def _dense(x2d: Tensor, codes, scales, weight, out_features, in_features, bias, transposed) -> Tensor:
    """The product through a bfloat16 copy of W and torch's GEMM (see DENSE_ROWS)."""
    quant_type, blocksize = weight[4], weight[5]
    numel = out_features * in_features
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH.buffer = torch.empty(numel, dtype=torch.bfloat16)
    w = buffer[:numel].view(out_features, in_features)
    _core.quant.dequantize_4bit(
        codes, scales, w.numel(), quant_type, blocksize, "bfloat16", "auto", numpy_bits(w)
    )  # fmt: skip
    if transposed:
        return torch.mm(x2d, w)
    if bias is None:
        return torch.mm(x2d, w.t())
    return torch.addmm(bias.detach().to(torch.bfloat16), x2d, w.t())


def _matmul(x2d: Tensor, weight, out_features, in_features, bias, transposed, backend, activations="exact"):
    """y = x W^T (+ bias), or x W when ``transposed``, in x's dtype, on ``backend``'s kernels
    (``activations="int8"``: x quantized per 8 elements). x2d is contiguous (common.py makes it so)."""
    packed, absmax, nested_absmax, nested_offset, quant_type, blocksize = weight
    rows = x2d.shape[0]
    codes, scales = _codes(packed), _scales(absmax, nested_absmax, nested_offset)
    if (
        x2d.dtype == torch.bfloat16
        and backend == "auto"
        and activations == "exact"
        and out_features * in_features <= DENSE_MAX_ELEMENTS
        and (dense_from := _dense_from()) is not None
        and rows >= dense_from
    ):
        return _dense(x2d, codes, scales, weight, out_features, in_features, bias, transposed)
    y = torch.empty(rows, in_features if transposed else out_features, dtype=x2d.dtype)
    name = _ops.FLOAT_NAMES[x2d.dtype]
    if bias is None and backend == "auto":  # the training and decode call: pointers, no views
        _core.quant.matmul_4bit_pointers(
            x2d.data_ptr(), name, rows, codes, scales, quant_type, blocksize, out_features, in_features,
            y.data_ptr(), transposed, activations,
        )  # fmt: skip
        return y
    bias_np = None if bias is None else numpy_bits(bias.detach().to(x2d.dtype).contiguous())
    x_np, y_np = numpy_bits(x2d.detach()), numpy_bits(y)
    _core.quant.matmul_4bit(
        x_np, name, rows, codes, scales, quant_type, blocksize, out_features, in_features, bias_np, transposed,
        backend, y_np, activations,
    )  # fmt: skip
    return y


@torch.library.register_kernel("halo::quantize_4bit", "cpu")
def _quantize_4bit(w: Tensor, quant_type: str, blocksize: int):
    _ops.check_quantize("halo::quantize_4bit", w, quant_type, blocksize)
    packed, absmax = _core.quant.quantize_4bit(
        numpy_bits(w.contiguous()), _ops.FLOAT_NAMES[w.dtype], quant_type, blocksize, "auto"
    )
    return torch.from_numpy(packed).reshape(-1, 1), torch.from_numpy(absmax)


@torch.library.register_kernel("halo::dequantize_4bit", "cpu")
def _dequantize_4bit(packed, absmax, nested_absmax, nested_offset, shape, quant_type, blocksize, dtype):
    numel = _ops.check_dequantize(
        "halo::dequantize_4bit", packed, absmax, nested_absmax, shape, quant_type, blocksize, dtype
    )
    out = torch.empty(numel, dtype=dtype)
    _core.quant.dequantize_4bit(
        _codes(packed),
        _scales(absmax, nested_absmax, nested_offset),
        numel,
        quant_type,
        blocksize,
        _ops.FLOAT_NAMES[dtype],
        "auto",
        numpy_bits(out),
    )
    return out.view(list(shape))


common.register_matmul_kernels("cpu", _matmul)


@torch.library.register_kernel("halo::double_quantize_absmax", "cpu")
def _double_quantize_absmax(absmax: Tensor, threads: int):
    _ops.check_absmax("halo::double_quantize_absmax", absmax)
    codes, nested, offset = _core.quant.double_quantize(
        _numpy(absmax.detach().contiguous()), _ops.NESTED_BLOCKSIZE, None, int(threads)
    )
    return torch.from_numpy(codes), torch.from_numpy(nested), torch.tensor(offset, dtype=torch.float32)
