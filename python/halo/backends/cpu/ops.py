"""CPU kernels of ``torch.ops.halo.*`` (the operators are defined in :mod:`halo.ops`).

Tensors cross to halo's C++ kernels as NumPy views taken through DLPack (no copy for contiguous tensors);
bfloat16 crosses as its uint16 bits. The matmuls run halo's fused 4-bit GEMM/GEMV
(halo/quant/matmul4.hpp: the codes are decoded inside the kernel, never as a whole W).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ... import _core
from ... import ops as _ops
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


def _scales(absmax: Tensor, nested_absmax: Tensor | None, nested_offset: float) -> np.ndarray:
    """The float32 per-block scales of a weight. With double quantization they are decoded once
    and kept on ``absmax`` (the forward, the recomputed forward and the backward of a step all
    ask for them), keyed by both tensors' storage and version so that any change re-decodes."""
    if nested_absmax is None:
        return np.ascontiguousarray(_numpy(absmax.contiguous()), dtype=np.float32)
    try:
        key = (absmax.data_ptr(), absmax._version, nested_absmax.data_ptr(), nested_absmax._version)
        key += (float(nested_offset), absmax.numel())
    except RuntimeError:  # inference tensors keep no version counter: decode every time
        key = None
    cached = getattr(absmax, "_halo_scales", None)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    values = np.ascontiguousarray(
        _core.quant.double_dequantize(
            _numpy(absmax.contiguous()),
            _numpy(nested_absmax.contiguous()),
            float(nested_offset),
            _ops.NESTED_BLOCKSIZE,
        ),
        dtype=np.float32,
    )
    if key is not None:
        absmax._halo_scales = (key, values)
    return values


def _matmul(
    x2d: Tensor,
    weight: tuple,
    out_features: int,
    in_features: int,
    bias,
    transposed,
    backend,
    activations="exact",
):
    """y = x W^T (+ bias), or x W when ``transposed``, in x's dtype, on ``backend``'s kernels
    (``activations="int8"``: x quantized per 8 elements)."""
    packed, absmax, nested_absmax, nested_offset, quant_type, blocksize = weight
    rows = x2d.shape[0]
    y = torch.empty(rows, in_features if transposed else out_features, dtype=x2d.dtype)
    bias_np = None if bias is None else numpy_bits(bias.detach().to(x2d.dtype).contiguous())
    _core.quant.matmul_4bit(
        numpy_bits(x2d.detach()),
        _ops.FLOAT_NAMES[x2d.dtype],
        rows,
        _numpy(packed.contiguous()).reshape(-1),
        _scales(absmax, nested_absmax, nested_offset),
        quant_type,
        blocksize,
        out_features,
        in_features,
        bias_np,
        transposed,
        backend,
        numpy_bits(y),
        activations,
    )
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
        _numpy(packed.contiguous()).reshape(-1),
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
