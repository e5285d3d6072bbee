"""PyTorch autograd glue for halo's LoRA kernels.

``lora_linear`` is a ``torch.autograd.Function`` whose forward and backward run
halo's C++ kernels (tensors cross as NumPy views, no copy for contiguous CPU
tensors).

- A 4-bit base (:class:`halo.QuantizedTensor`) with float32, float16 or bfloat16
  x: the base products ``x W^T`` and ``grad_y W`` run on :func:`halo.matmul_4bit`
  / :func:`halo.matmul_4bit_transposed` in x's dtype (AMX tiles for bfloat16 where
  the CPU has them); the rank-r LoRA products run in torch in the adapter's dtype,
  as PEFT does (x is cast to ``lora_A``'s dtype, the sum is cast back to x's).
- A float base, or float64 x (so ``torch.autograd.gradcheck`` exercises the same
  kernels): the whole layer runs in halo's C++ LoRA kernels, float16/bfloat16
  inputs computed in float32 and cast back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import _core
from .backend import check_backend
from .lora import (
    _as_rows,
    _check_adapter_shapes,
    _check_dropout,
    _check_scaling,
    _check_seed,
    _describe_base,
)
from .quant import QuantizedTensor, matmul_4bit, matmul_4bit_transposed

__all__ = ["lora_linear"]


def _numpy(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return tensor.detach().to(dtype=dtype).contiguous().numpy()


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, base_info, settings):  # type: ignore[override]
        out_features, in_features, fan_in_fan_out, scaling, dropout, seed, backend = settings
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        rows = _as_rows("lora_linear", _numpy(x, compute), in_features)
        a, b = _numpy(lora_a, compute), _numpy(lora_b, compute)
        bias_np = None if bias is None else _numpy(bias, compute).reshape(-1)
        y = _core.lora.forward(
            rows,
            a,
            b,
            bias_np,
            base_info.buffer,
            base_info.dtype,
            out_features,
            in_features,
            fan_in_fan_out,
            scaling,
            dropout,
            seed,
            base_info.absmax,
            base_info.blocksize,
            backend,
        )
        ctx.save_for_backward(x, lora_a, lora_b)
        ctx.base_info = base_info
        ctx.settings = settings
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return torch.from_numpy(y).reshape(*x.shape[:-1], out_features).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, lora_a, lora_b = ctx.saved_tensors
        out_features, in_features, fan_in_fan_out, scaling, dropout, seed, backend = ctx.settings
        info = ctx.base_info
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        want_bias = ctx.has_bias and ctx.needs_input_grad[3]
        dx, da, db, dbias = _core.lora.backward(
            _numpy(grad_y, compute).reshape(-1, out_features),
            _as_rows("lora_linear", _numpy(x, compute), in_features),
            _numpy(lora_a, compute),
            _numpy(lora_b, compute),
            want_bias,
            info.buffer,
            info.dtype,
            out_features,
            in_features,
            fan_in_fan_out,
            scaling,
            dropout,
            seed,
            info.absmax,
            info.blocksize,
            backend,
        )
        grad_x = torch.from_numpy(dx).reshape(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_a = torch.from_numpy(da).to(lora_a.dtype) if ctx.needs_input_grad[1] else None
        grad_b = torch.from_numpy(db).to(lora_b.dtype) if ctx.needs_input_grad[2] else None
        grad_bias = torch.from_numpy(dbias).to(ctx.bias_dtype) if want_bias else None
        return grad_x, grad_a, grad_b, grad_bias, None, None


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dropout_scale(seed: int, shape: tuple[int, int], p: float) -> torch.Tensor:
    """halo's dropout mask for x of ``shape``: 0 for a dropped element, 1 / (1 - p) for a kept one."""
    return torch.from_numpy(_core.lora.dropout_mask(seed, shape[0] * shape[1], p)).reshape(shape)


class _Lora4bit(torch.autograd.Function):
    """The layer over a 4-bit base, for float32 / float16 / bfloat16 x (see the module doc).
    Few torch operations per call: the LoRA term goes in with one addmm."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, qt, settings):  # type: ignore[override]
        out_features, in_features, fan_in_fan_out, scaling, dropout, seed, backend = settings
        rows = x.detach().reshape(-1, in_features)
        if fan_in_fan_out:  # W stored [in, out]: x W^T is x times the stored matrix
            base = matmul_4bit_transposed(rows, qt, backend=backend)
            if bias is not None:
                base = base + bias.detach().to(base.dtype)
        else:
            base = matmul_4bit(rows, qt, bias=None if bias is None else bias.detach(), backend=backend)
        compute = lora_a.dtype
        dropped = rows.to(compute)
        mask = None
        if dropout > 0.0:
            mask = _dropout_scale(seed, tuple(rows.shape), dropout).to(compute)
            dropped = dropped * mask
        t = dropped @ lora_a.detach().t()
        y = torch.addmm(base.to(compute), t, lora_b.detach().t(), alpha=scaling).to(x.dtype)
        ctx.save_for_backward(dropped, t, lora_a, lora_b, mask)
        ctx.qt = qt
        ctx.settings = settings
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        dropped, t, lora_a, lora_b, mask = ctx.saved_tensors
        out_features, _, fan_in_fan_out, scaling, _, _, backend = ctx.settings
        g = grad_y.reshape(-1, out_features)
        gc = g.to(lora_a.dtype)
        dt = torch.mm(gc, lora_b).mul_(scaling)  # gradient of t, [rows, r]
        grad_a = dt.t() @ dropped if ctx.needs_input_grad[1] else None
        grad_b = torch.mm(gc.t(), t).mul_(scaling) if ctx.needs_input_grad[2] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gx = g.to(ctx.x_dtype).contiguous()
            base = (matmul_4bit if fan_in_fan_out else matmul_4bit_transposed)(gx, ctx.qt, backend=backend)
            if mask is None:
                grad_x = torch.addmm(base.to(lora_a.dtype), dt, lora_a)
            else:
                grad_x = torch.mm(dt, lora_a).mul_(mask).add_(base)
            grad_x = grad_x.to(ctx.x_dtype).reshape(ctx.x_shape)
        return grad_x, grad_a, grad_b, grad_bias, None, None


def lora_linear(
    x: torch.Tensor,
    base: Any,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    bias: torch.Tensor | None = None,
    training: bool = True,
    fan_in_fan_out: bool = False,
    seed: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x W^T (+ bias) + scaling * dropout(x) A^T B^T`` with gradients for x, A, B
    and bias (the base is frozen: it gets none).

    ``base`` is a float tensor ``[out, in]`` (``[in, out]`` with ``fan_in_fan_out``)
    or a 4-bit :class:`halo.QuantizedTensor`. Dropout applies only when ``training``;
    its mask comes from ``seed`` (drawn from torch's generator when None, so
    ``torch.manual_seed`` makes runs repeatable) and backward reuses it.
    """
    fn = "lora_linear"
    for name, value in (("x", x), ("A", A), ("B", B)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"[{fn}] {name} must be a torch tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"[{fn}] {name} must be a float tensor, got {value.dtype}")
        if value.device.type != "cpu":
            raise ValueError(f"[{fn}] {name} must be on the CPU, got device {value.device}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()):
        raise TypeError(f"[{fn}] bias must be a float tensor or None, got {type(bias).__name__}")
    if not isinstance(base, (torch.Tensor, QuantizedTensor)):
        raise TypeError(f"[{fn}] base must be a torch tensor or a QuantizedTensor, got {type(base).__name__}")
    scaling = _check_scaling(fn, scaling)
    dropout = _check_dropout(fn, dropout)
    check_backend(fn, backend)
    four_bit = isinstance(base, QuantizedTensor) and x.dtype in _KERNEL_DTYPES
    if four_bit and len(base.shape) != 2:
        raise ValueError(f"[{fn}] the base weight must be 2-D, got shape {base.shape}")
    info = None if four_bit else _describe_base(fn, base)
    base_shape = tuple(base.shape) if four_bit else info.shape
    out_features, in_features, _ = _check_adapter_shapes(
        fn, base_shape, tuple(A.shape), tuple(B.shape), bool(fan_in_fan_out)
    )
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"[{fn}] x has shape {tuple(x.shape)}, expected [..., {in_features}]")
    if bias is not None and bias.numel() != out_features:
        raise ValueError(f"[{fn}] bias has {bias.numel()} elements, expected {out_features}")
    p = dropout if training else 0.0
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0.0 else 0
    seed = _check_seed(fn, seed)
    settings = (out_features, in_features, bool(fan_in_fan_out), scaling, p, seed, backend)
    if four_bit:
        return _Lora4bit.apply(x, A, B, bias, base, settings)
    return _LoraLinear.apply(x, A, B, bias, info, settings)
