"""The 4-bit matmul for NumPy arrays and torch tensors: ``y = x W^T (+ bias)`` and its
transpose ``x W`` (the input gradient), with ``W`` a :class:`QuantizedTensor`, computed by halo's
fused kernels (dequantized tile by tile inside the GEMM, never as a whole). Torch tensors on
the CPU take the operator :mod:`halo.ops` registers; CUDA tensors run on their device pointers.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .. import _core
from .._arrays import flatten_float, is_torch_tensor, restore
from ..backend import check_backend
from ..formats import KERNEL_FLOATS
from .tensor import QuantizedTensor, writable_flat


def matmul_4bit(
    x: Any,
    qt: QuantizedTensor,
    bias: Any = None,
    out: Any = None,
    backend: str = "auto",
    activations: str = "exact",
) -> Any:
    """``y = x @ W.T (+ bias)`` for a 2-D 4-bit ``W`` of shape ``[out, in]``: a Linear
    layer's forward, computed from the packed codes (never dequantizing W as a whole).

    ``x``: NumPy array or torch tensor (CPU, or CUDA in a build with CUDA), float32,
    float16 or bfloat16, shape ``[..., in]``, any layout. Returns the same kind and
    dtype, shape ``[..., out]``. W is taken at x's precision (exactly
    ``dequantize_4bit(W, x.dtype)``) and products are summed in float32; ``bias``
    (``[out]``, any float dtype) is converted to x's dtype and added before the one
    final rounding. ``out``: a C-contiguous array/tensor of x's dtype and the result's
    element count to write into. Not differentiable: ``halo.lora.autograd`` and the torch ops
    built on it provide gradients.

    ``activations="int8"`` (CPU, inference): x is quantized once per call, per row and per
    8 elements, to int8 with a float32 scale (``d = max|x| / 127``), the NF4/FP4 codes are
    taken as int8 (``round(code * 127)``, FP4 ``* 120``) and the integer dot products
    (AVX512-VNNI / AVX-VNNI / AVX2) are scaled and summed in float32, as llama.cpp's Q8
    activation blocks. Under 1 % relative error against ``"exact"`` (the default);
    docs/quantization.md has the measured figures.
    """
    if not isinstance(activations, str) or activations not in _ACTIVATIONS:
        raise ValueError(f"[matmul_4bit] activations must be 'exact' or 'int8', got {activations!r}")
    return _matmul("matmul_4bit", x, qt, bias, out, backend, transposed=False, activations=activations)


def matmul_4bit_transposed(x: Any, qt: QuantizedTensor, out: Any = None, backend: str = "auto") -> Any:
    """``y = x @ W`` for a 2-D 4-bit ``W`` ``[out, in]`` and ``x`` ``[..., out]``: the
    input gradient of :func:`matmul_4bit` (``grad_x = grad_y @ W``). Kinds, dtypes and
    precision as :func:`matmul_4bit`; the result is ``[..., in]``."""
    return _matmul("matmul_4bit_transposed", x, qt, None, out, backend, transposed=True)


_ACTIVATIONS = ("exact", "int8")
_TORCH_FLOATS: dict[Any, str] = {}


def _matmul_torch_cpu(x: Any, qt: QuantizedTensor, transposed: bool, activations: str = "exact") -> Any:
    """The call a decode loop makes (a contiguous CPU torch tensor, no bias, no out, backend
    auto) with only the checks it needs: a few microseconds where the general path takes
    tens, which small layers at one row would pay on every call. Anything else returns None
    and goes the general way, which checks everything and names what is wrong."""
    torch = sys.modules.get("torch")
    if (
        torch is None or type(x) is not torch.Tensor
    ):  # subclasses (Parameter, fake tensors) go the general way
        return None
    if not _TORCH_FLOATS:
        _TORCH_FLOATS.update(
            {getattr(torch, name): name for name in KERNEL_FLOATS}
        )  # ops.FLOAT_NAMES, without importing the ops
    entry = _TORCH_FLOATS.get(x.dtype)
    shape = qt.shape
    if (
        entry is None
        or len(shape) != 2
        or x.dim() == 0
        or x.device.type != "cpu"
        or x.layout != torch.strided
        or not x.is_contiguous()
    ):
        return None
    out_features, in_features = int(shape[0]), int(shape[1])
    x_cols, y_cols = (out_features, in_features) if transposed else (in_features, out_features)
    if x.shape[-1] != x_cols:
        return None
    y = torch.empty((*x.shape[:-1], y_cols), dtype=x.dtype)
    weight = _weight_arguments(qt, out_features, in_features)
    _core.quant.matmul_4bit_pointers(
        x.data_ptr(), entry, x.numel() // x_cols, *weight, y.data_ptr(), transposed, activations
    )
    return y


def _weight_arguments(qt: QuantizedTensor, out_features: int, in_features: int) -> tuple:
    """W as the matmul kernels take it: packed codes, float32 absmax, format and shape."""
    return (*qt.kernel_arrays(), qt.quant_type, qt.blocksize, out_features, in_features)


def _matmul(
    fn: str, x: Any, qt: Any, bias: Any, out: Any, backend: str, transposed: bool, activations: str = "exact"
) -> Any:
    if out is None and bias is None and backend == "auto" and type(qt) is QuantizedTensor:
        y = _matmul_torch_cpu(x, qt, transposed, activations)
        if y is not None:
            return y
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"[{fn}] W must be a QuantizedTensor, got {type(qt).__name__}")
    if len(qt.shape) != 2:
        raise ValueError(f"[{fn}] W must be 2-D [out, in], got shape {qt.shape}")
    check_backend(fn, backend)
    out_features, in_features = (int(d) for d in qt.shape)
    x_cols, y_cols = (out_features, in_features) if transposed else (in_features, out_features)
    if out is not None and not (is_torch_tensor(out) or isinstance(out, np.ndarray)):
        raise TypeError(f"[{fn}] out must be a NumPy array or a torch tensor, got {type(out).__name__}")
    if is_torch_tensor(x) and x.device.type == "cuda":
        if activations != "exact":
            raise ValueError(f"[{fn}] activations={activations!r} runs on the CPU only; x is on {x.device}")
        return _matmul_cuda(fn, x, qt, bias, out, backend, transposed, x_cols, y_cols)
    flat = flatten_float(fn, x)
    if len(flat.shape) == 0 or flat.shape[-1] != x_cols:
        raise ValueError(
            f"[{fn}] x has shape {flat.shape}, expected [..., {x_cols}] for W of shape {qt.shape}"
        )
    rows = flat.data.size // x_cols
    bias_data = None if bias is None else _bias_as(fn, bias, flat.dtype, y_cols)
    target = None if out is None else writable_flat(fn, out, flat.dtype, rows * y_cols)
    weight = _weight_arguments(qt, out_features, in_features)
    result = _core.quant.matmul_4bit(
        flat.data, flat.dtype, rows, *weight, bias_data, transposed, backend, target, activations
    )
    if out is not None:
        return out
    return restore(result, flat.dtype, (*flat.shape[:-1], y_cols), flat.kind)


def _bias_as(fn: str, bias: Any, dtype: str, count: int) -> np.ndarray:
    """The bias as a flat array of ``dtype`` (bfloat16 as uint16 bits)."""
    flat = flatten_float(f"{fn}: bias", bias)
    if flat.data.size != count:
        raise ValueError(f"[{fn}] bias has {flat.data.size} elements, expected {count}")
    if flat.dtype == dtype:
        return flat.data
    values = (
        flat.data.astype(np.float32)
        if flat.dtype != "bfloat16"
        else ((flat.data.astype(np.uint32) << 16).view(np.float32))
    )
    if dtype == "float32":
        return values
    if dtype == "float16":
        return values.astype(np.float16)
    bits = values.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # nearest even, as torch
    rounded[np.isnan(values)] = 0x7FC0
    return rounded


def _matmul_cuda(fn, x, qt, bias, out, backend, transposed, x_cols, y_cols):
    import torch

    if backend not in ("auto", "cuda"):
        raise ValueError(f"[{fn}] x is on {x.device}: backend must be 'auto' or 'cuda', got {backend!r}")
    from ..ops import FLOAT_NAMES as names

    if x.dtype not in names:
        raise TypeError(f"[{fn}] expected a float32, float16 or bfloat16 tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != x_cols:
        raise ValueError(
            f"[{fn}] x has shape {tuple(x.shape)}, expected [..., {x_cols}] for W of shape {qt.shape}"
        )
    x = x.detach().contiguous()
    rows = x.numel() // x_cols
    packed, absmax = qt._device_arrays(x.device)
    if out is None:
        y = torch.empty(*x.shape[:-1], y_cols, dtype=x.dtype, device=x.device)
    else:
        if (
            not is_torch_tensor(out)
            or out.device != x.device
            or not out.is_contiguous()
            or out.dtype != x.dtype
        ):
            raise ValueError(f"[{fn}] out must be a contiguous {x.dtype} tensor on {x.device}")
        if out.numel() != rows * y_cols:
            raise ValueError(f"[{fn}] out holds {out.numel()} elements, expected {rows * y_cols}")
        y = out
    bias_t = None
    if bias is not None:
        bias_t = torch.as_tensor(bias).to(device=x.device, dtype=x.dtype).contiguous().reshape(-1)
        if bias_t.numel() != y_cols:
            raise ValueError(f"[{fn}] bias has {bias_t.numel()} elements, expected {y_cols}")
    stream = torch.cuda.current_stream(x.device).cuda_stream
    with torch.cuda.device(x.device):
        _core.quant.matmul_4bit_device(
            x.data_ptr(),
            names[x.dtype],
            rows,
            packed.data_ptr(),
            absmax.data_ptr(),
            qt.quant_type,
            qt.blocksize,
            int(qt.shape[0]),
            int(qt.shape[1]),
            0 if bias_t is None else bias_t.data_ptr(),
            y.data_ptr(),
            transposed,
            stream,
        )
    return y


__all__ = ["matmul_4bit", "matmul_4bit_transposed"]
