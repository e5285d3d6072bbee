"""PyTorch autograd glue for halo's LoRA kernels: ``lora_linear``.

- A 4-bit base (:class:`halo.QuantizedTensor`) with float32, float16 or bfloat16 x: a thin
  wrapper over ``torch.ops.halo.lora_linear`` (:mod:`halo.ops`, the op PEFT's LoRA layer on
  halo runs): the base products ``x W^T`` and ``grad_y W`` on halo's fused 4-bit kernels in
  x's dtype, the rank-r products in torch in the adapter's dtype, as PEFT does; dropout is
  halo's seeded mask on the adapter input.
- A float base, or float64 x (so ``torch.autograd.gradcheck`` exercises the same kernels):
  the whole layer runs in halo's C++ LoRA kernels (src/lora), float16/bfloat16 inputs
  computed in float32 and cast back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import _core, ops
from ..backend import check_backend
from ..quant import QuantizedTensor
from .linear import (
    as_rows,
    base_arguments,
    check_adapter_shapes,
    check_dropout,
    check_scaling,
    check_seed,
    describe_base,
)

__all__ = ["lora_linear"]


def _numpy(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return tensor.detach().to(dtype=dtype).contiguous().numpy()


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, base_info, settings):  # type: ignore[override]
        out_features, in_features = settings[:2]
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        rows = as_rows("lora_linear", _numpy(x, compute), in_features)
        a, b = _numpy(lora_a, compute), _numpy(lora_b, compute)
        bias_np = None if bias is None else _numpy(bias, compute).reshape(-1)
        y = _core.lora.forward(rows, a, b, bias_np, *base_arguments(base_info, settings))
        ctx.save_for_backward(x, lora_a, lora_b)
        ctx.base_info = base_info
        ctx.settings = settings
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return torch.from_numpy(y).reshape(*x.shape[:-1], out_features).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, lora_a, lora_b = ctx.saved_tensors
        out_features, in_features = ctx.settings[:2]
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        want_bias = ctx.has_bias and ctx.needs_input_grad[3]
        dx, da, db, dbias = _core.lora.backward(
            _numpy(grad_y, compute).reshape(-1, out_features),
            as_rows("lora_linear", _numpy(x, compute), in_features),
            *(_numpy(lora_a, compute), _numpy(lora_b, compute), want_bias),
            *base_arguments(ctx.base_info, ctx.settings),
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


def _lora_4bit(x, qt: QuantizedTensor, lora_a, lora_b, bias, settings):
    """The layer over a 4-bit base for float32 / float16 / bfloat16 x: ``torch.ops.halo.lora_linear``
    (the op PEFT's LoRA layer on halo runs), its adapter input ``x`` masked by halo's dropout."""
    out_features, in_features, fan_in_fan_out, scaling, dropout, seed, backend = settings
    x_lora = x.to(lora_a.dtype)
    if dropout > 0.0:
        rows = x.numel() // in_features
        x_lora = x_lora * _dropout_scale(seed, (rows, in_features), dropout).to(lora_a.dtype).reshape(x.shape)
    nested = None if not qt.double_quant else torch.from_numpy(np.ascontiguousarray(qt.nested_absmax))
    return ops.lora_linear(
        x,
        torch.from_numpy(np.ascontiguousarray(qt.packed)).reshape(-1, 1),
        torch.from_numpy(np.ascontiguousarray(qt.absmax)),
        out_features,
        lora_a,
        lora_b,
        scaling,
        qt.quant_type,
        qt.blocksize,
        bias,
        nested,
        float(qt.nested_offset or 0.0),
        x_lora,
        fan_in_fan_out,
        backend,
    )


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
    scaling = check_scaling(fn, scaling)
    dropout = check_dropout(fn, dropout)
    check_backend(fn, backend)
    four_bit = isinstance(base, QuantizedTensor) and x.dtype in _KERNEL_DTYPES
    if four_bit and len(base.shape) != 2:
        raise ValueError(f"[{fn}] the base weight must be 2-D, got shape {base.shape}")
    info = None if four_bit else describe_base(fn, base)
    base_shape = tuple(base.shape) if four_bit else info.shape
    out_features, in_features, _ = check_adapter_shapes(
        fn, base_shape, tuple(A.shape), tuple(B.shape), bool(fan_in_fan_out)
    )
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"[{fn}] x has shape {tuple(x.shape)}, expected [..., {in_features}]")
    if bias is not None and bias.numel() != out_features:
        raise ValueError(f"[{fn}] bias has {bias.numel()} elements, expected {out_features}")
    p = dropout if training else 0.0
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0.0 else 0
    seed = check_seed(fn, seed)
    settings = (out_features, in_features, bool(fan_in_fan_out), scaling, p, seed, backend)
    if four_bit:
        return _lora_4bit(x, base, A, B, bias, settings)
    return _LoraLinear.apply(x, A, B, bias, info, settings)
