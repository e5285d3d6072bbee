"""halo's 4-bit operations as torch operators (``torch.ops.halo.*``).

Registered with ``torch.library`` so they keep the device and dtype of their
inputs, have fake (meta) kernels for ``torch.compile`` and the meta device, and
carry autograd formulas:

- ``halo::quantize_4bit(w, quant_type, blocksize) -> (packed, absmax)``
- ``halo::dequantize_4bit(packed, absmax, nested_absmax, nested_offset, shape, quant_type, blocksize, dtype)``
- ``halo::matmul_4bit(x, packed, absmax, nested_absmax, nested_offset, out_features, quant_type, blocksize,
  bias) -> x W^T + bias`` (gradients for x and bias; the 4-bit weight is frozen)
- ``halo::lora_linear(x, x_lora, <4-bit weight>, bias, lora_A, lora_B, scaling)`` ->
  ``x W^T + bias + scaling * (x_lora A^T) B^T``: the base 4-bit matmul and the adapter in one
  op; ``x_lora`` is the (dropped-out) adapter input, usually ``dropout(x)`` drawn from torch's RNG;
  ``out_dtype`` (default x's) is the result's dtype, so a float32 caller computing in bf16 gets
  float32 back without a bf16 round trip.

The weight is bitsandbytes' layout: ``packed`` uint8 ``[(n + 1) // 2, 1]``; ``absmax``
float32 per block, or with double quantization uint8 codes of the signed dynamic
map plus ``nested_absmax`` (float32 per 256 blocks) and ``nested_offset``.

This module is the one place the operators are defined (schema, argument checks, fake
kernels, autograd). Their kernels are registered per device with
``torch.library.register_kernel``, as bitsandbytes does: ``halo/backends/cpu/ops.py`` (halo's
C++ kernels over NumPy views, no copy) and ``halo/backends/cuda/ops.py`` (device pointers,
the current stream, no host round trip; a build without CUDA raises instead of moving data
to the CPU). A tensor on any other device gets a clear error. The matmuls run halo's fused
4-bit GEMM/GEMV: the weight is decoded inside the kernel, never as a whole.

Long module: every torch-facing op of halo is defined here once (schema, fake kernel,
autograd), by design: one place to read what the ops accept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .formats import KERNEL_FLOATS, check_bnb4_format

__all__ = ["FLOAT_NAMES", "dequantize_4bit", "lora_linear", "matmul_4bit", "quantize_4bit"]

NESTED_BLOCKSIZE = 256
# The torch float dtypes halo's kernels take, by the name the C++ side uses (the one such map).
FLOAT_NAMES: dict[torch.dtype, str] = {getattr(torch, name): name for name in KERNEL_FLOATS}


# -- argument checks (shared by every op; they run in the fake kernels too) ----------------------


_check_format = check_bnb4_format


def check_float(fn: str, name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_NAMES:
        raise TypeError(f"[{fn}] {name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_weight(
    fn: str,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    numel: int,
    quant_type: str,
    blocksize: int,
) -> None:
    _check_format(fn, quant_type, blocksize)
    if numel <= 0:
        raise ValueError(f"[{fn}] the weight holds no elements")
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"[{fn}] packed must be uint8 with {(numel + 1) // 2} bytes, got {packed.dtype} with {packed.numel()}"
        )
    blocks = -(-numel // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"[{fn}] absmax holds {absmax.numel()} values, expected {blocks}")
    if nested_absmax is None:
        if absmax.dtype != torch.float32:
            raise TypeError(f"[{fn}] absmax must be float32 without nested statistics, got {absmax.dtype}")
    else:
        if absmax.dtype != torch.uint8:
            raise TypeError(f"[{fn}] absmax must be uint8 codes with nested statistics, got {absmax.dtype}")
        nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != nested_blocks:
            raise ValueError(
                f"[{fn}] nested_absmax must be float32[{nested_blocks}], "
                f"got {nested_absmax.dtype}[{nested_absmax.numel()}]"
            )
    for name, t in (("packed", packed), ("absmax", absmax), ("nested_absmax", nested_absmax)):
        if t is not None and t.device != packed.device:
            raise ValueError(f"[{fn}] {name} is on {t.device}, packed on {packed.device}")


def check_same_device(fn: str, x: Tensor, packed: Tensor) -> None:
    if x.device != packed.device:
        raise ValueError(
            f"[{fn}] x is on {x.device} but the 4-bit weight on {packed.device}; move one of them"
        )


# -- the checks each kernel runs first (backends/common.py holds the rest of the shared part) -----


def check_quantize(fn: str, w: Tensor, quant_type: str, blocksize: int) -> int:
    """Checks quantize_4bit's arguments; returns the element count."""
    _check_format(fn, quant_type, blocksize)
    check_float(fn, "w", w)
    if w.numel() == 0:
        raise ValueError(f"[{fn}] the tensor is empty (shape {tuple(w.shape)})")
    return w.numel()


def check_dequantize(fn, packed, absmax, nested_absmax, shape, quant_type, blocksize, dtype) -> int:
    """Checks dequantize_4bit's arguments; returns the element count."""
    numel = math.prod(shape) if len(shape) else 1
    check_weight(fn, packed, absmax, nested_absmax, numel, quant_type, blocksize)
    if dtype not in FLOAT_NAMES:
        raise TypeError(f"[{fn}] dtype must be float32, float16 or bfloat16, got {dtype}")
    return numel


def check_backend(fn: str, backend: str) -> None:
    from .backend import check_backend

    check_backend(fn, backend)


def _no_kernel(fn: str, t: Tensor):
    raise ValueError(f"[{fn}] no halo kernel for device {t.device} (halo has cpu and cuda kernels)")


# -- halo::quantize_4bit ---------------------------------------------------------------------------


@torch.library.custom_op("halo::quantize_4bit", mutates_args=())
def _quantize_4bit_op(w: Tensor, quant_type: str, blocksize: int) -> tuple[Tensor, Tensor]:
    check_quantize("halo::quantize_4bit", w, quant_type, blocksize)
    _no_kernel("halo::quantize_4bit", w)


@_quantize_4bit_op.register_fake
def _(w, quant_type, blocksize):
    _check_format("halo::quantize_4bit", quant_type, blocksize)
    n = w.numel()
    return (
        w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
        w.new_empty((-(-n // blocksize),), dtype=torch.float32),
    )


# -- halo::double_quantize_absmax -------------------------------------------------------------------


@torch.library.custom_op("halo::double_quantize_absmax", mutates_args=())
def _double_quantize_op(absmax: Tensor, threads: int) -> tuple[Tensor, Tensor, Tensor]:
    """bitsandbytes' nested statistics of float32 ``absmax``: offset = its mean (summed as torch
    sums with ``threads`` threads), then 8-bit codes of the signed dynamic map in blocks of 256.
    Returns (codes uint8 like absmax, nested_absmax float32 per block, offset float32 0-d)."""
    check_absmax("halo::double_quantize_absmax", absmax)
    _no_kernel("halo::double_quantize_absmax", absmax)


def check_absmax(fn: str, absmax: Tensor) -> None:
    if absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() == 0:
        raise ValueError(
            f"[{fn}] absmax must be a non-empty 1-D float32 tensor, got {absmax.dtype}{list(absmax.shape)}"
        )


@_double_quantize_op.register_fake
def _(absmax, threads):
    check_absmax("halo::double_quantize_absmax", absmax)
    return (
        absmax.new_empty(absmax.shape, dtype=torch.uint8),
        absmax.new_empty((-(-absmax.numel() // NESTED_BLOCKSIZE),), dtype=torch.float32),
        absmax.new_empty((), dtype=torch.float32),
    )


# -- halo::dequantize_4bit -------------------------------------------------------------------------


@torch.library.custom_op("halo::dequantize_4bit", mutates_args=())
def _dequantize_4bit_op(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_offset: float,
    shape: list[int],
    quant_type: str,
    blocksize: int,
    dtype: torch.dtype,
) -> Tensor:
    fn = "halo::dequantize_4bit"
    check_dequantize(fn, packed, absmax, nested_absmax, shape, quant_type, blocksize, dtype)
    _no_kernel(fn, packed)


@_dequantize_4bit_op.register_fake
def _(packed, absmax, nested_absmax, nested_offset, shape, quant_type, blocksize, dtype):
    _check_format("halo::dequantize_4bit", quant_type, blocksize)
    return packed.new_empty(list(shape), dtype=dtype)


# -- halo::matmul_4bit -----------------------------------------------------------------------------


@torch.library.custom_op("halo::matmul_4bit", mutates_args=())
def _matmul_4bit_op(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_offset: float,
    out_features: int,
    quant_type: str,
    blocksize: int,
    bias: Tensor | None,
    activations: str = "exact",
) -> Tensor:
    _no_kernel("halo::matmul_4bit", x)


def check_activations(fn: str, activations: str) -> None:
    """``"exact"`` or ``"int8"`` (x quantized per 8 elements: inference only, CPU)."""
    if activations not in ("exact", "int8"):
        raise ValueError(f"[{fn}] activations must be 'exact' or 'int8', got {activations!r}")


@_matmul_4bit_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_offset, out_features, quant_type, blocksize, *rest):
    # rest: bias, then the defaulted activations (left out by the dispatcher when "exact")
    _check_format("halo::matmul_4bit", quant_type, blocksize)
    check_activations("halo::matmul_4bit", rest[1] if len(rest) > 1 else "exact")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("halo::matmul_4bit_grad", mutates_args=())
def _matmul_4bit_grad_op(
    grad: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_offset: float,
    in_features: int,
    quant_type: str,
    blocksize: int,
    fan_in_fan_out: bool = False,
    backend: str = "auto",
) -> Tensor:
    """grad W for grad [..., out]: the input gradient of the frozen 4-bit base (an op of its
    own so that backward graphs trace through it with a fake kernel)."""
    _no_kernel("halo::matmul_4bit_grad", grad)


@_matmul_4bit_grad_op.register_fake
def _(grad, packed, absmax, nested_absmax, nested_offset, in_features, quant_type, blocksize, *_):
    return grad.new_empty((*grad.shape[:-1], in_features))


def _matmul_setup(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_offset, out_features, quant_type, blocksize, bias, *rest = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax)
    activations = rest[0] if rest else "exact"
    ctx.meta = (
        nested_offset,
        out_features,
        x.shape[-1],
        quant_type,
        blocksize,
        bias is not None,
        activations,
    )


def _matmul_backward(ctx, grad):
    packed, absmax, nested_absmax = ctx.saved_tensors
    nested_offset, out_features, in_features, quant_type, blocksize, has_bias, activations = ctx.meta
    grad_x = grad_bias = None
    grad2d = grad.reshape(-1, out_features)
    if ctx.needs_input_grad[0]:
        if activations != "exact":
            raise RuntimeError(
                f"[halo::matmul_4bit] activations={activations!r} is for inference and has no backward; "
                "train with activations='exact'"
            )
        grad_x = torch.ops.halo.matmul_4bit_grad(
            grad, packed, absmax, nested_absmax, nested_offset, in_features, quant_type, blocksize
        )
    if has_bias and ctx.needs_input_grad[8]:
        grad_bias = grad2d.sum(0)
    return grad_x, None, None, None, None, None, None, None, grad_bias, None


_matmul_4bit_op.register_autograd(_matmul_backward, setup_context=_matmul_setup)


# -- halo::lora_linear (fused base + adapter) ------------------------------------------------------


@torch.library.custom_op("halo::lora_linear", mutates_args=())
def _lora_linear_op(
    x: Tensor,
    x_lora: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_offset: float,
    out_features: int,
    quant_type: str,
    blocksize: int,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    fan_in_fan_out: bool = False,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    _no_kernel("halo::lora_linear", x)


def check_lora(fn, x, x_lora, lora_A, lora_B, out_features, in_features):
    if x_lora.shape != x.shape:
        raise ValueError(f"[{fn}] x_lora has shape {tuple(x_lora.shape)}, x {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"[{fn}] lora_A has shape {tuple(lora_A.shape)}, expected [r, {in_features}]")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_features, lora_A.shape[0]):
        raise ValueError(
            f"[{fn}] lora_B has shape {tuple(lora_B.shape)}, expected [{out_features}, {lora_A.shape[0]}]"
        )
    for name, t in (("x_lora", x_lora), ("lora_A", lora_A), ("lora_B", lora_B)):
        check_float(fn, name, t)
        if t.device != x.device:
            raise ValueError(f"[{fn}] {name} is on {t.device}, x on {x.device}")


@_lora_linear_op.register_fake
def _(x, x_lora, packed, absmax, nested_absmax, nested_offset, out_features, quant_type, blocksize, *rest):
    # rest: bias, lora_A, lora_B, scaling, then the defaulted fan_in_fan_out, backend, out_dtype
    # (the dispatcher leaves out trailing arguments that hold their defaults)
    _check_format("halo::lora_linear", quant_type, blocksize)
    out_dtype = rest[6] if len(rest) > 6 else None
    return x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype or x.dtype)


def _lora_setup(ctx, inputs, output):
    x, x_lora, packed, absmax, nested_absmax, nested_offset, out_features, quant_type = inputs[:8]
    blocksize, bias, lora_A, lora_B, scaling = inputs[8:13]
    given = tuple(inputs[13:15])  # trailing arguments left at their defaults are not passed
    fan_in_fan_out, backend = given + (False, "auto")[len(given) :]
    ctx.save_for_backward(x_lora, packed, absmax, nested_absmax, lora_A, lora_B)
    layout = (nested_offset, out_features, x.shape[-1], quant_type, blocksize, bias is not None)
    ctx.meta = (*layout, float(scaling), x.dtype, x_lora.dtype, bool(fan_in_fan_out), backend)


def _lora_backward(ctx, grad):
    x_lora, packed, absmax, nested_absmax, lora_A, lora_B = ctx.saved_tensors
    nested_offset, out_features, in_features, quant_type, blocksize, has_bias = ctx.meta[:6]
    scaling, x_dtype, xl_dtype, fan_in_fan_out, backend = ctx.meta[6:]
    need = ctx.needs_input_grad
    grad2d = grad.reshape(-1, out_features)
    lead = grad.shape[:-1]
    grad_x = grad_x_lora = grad_bias = grad_a = grad_b = None
    if need[0]:
        weight = (packed, absmax, nested_absmax, nested_offset, in_features, quant_type, blocksize)
        grad_x = torch.ops.halo.matmul_4bit_grad(grad.to(x_dtype), *weight, fan_in_fan_out, backend)
    if has_bias and need[9]:
        grad_bias = grad2d.sum(0)
    if need[1] or need[10] or need[11]:
        with torch.autocast(grad.device.type, enabled=False):
            # scaling goes on the [m, r] products, never on the [m, out] gradient
            g = grad2d.to(lora_A.dtype)
            xl = x_lora.reshape(-1, in_features).to(lora_A.dtype)
            grad_hidden = torch.mm(g, lora_B)  # [m, r]
            if scaling != 1.0:
                grad_hidden.mul_(scaling)
            if need[11]:
                hidden = torch.mm(xl, lora_A.t())
                if scaling != 1.0:
                    hidden.mul_(scaling)
                grad_b = torch.mm(g.t(), hidden)
            if need[10]:
                grad_a = torch.mm(grad_hidden.t(), xl)
            if need[1]:
                grad_x_lora = torch.mm(grad_hidden, lora_A).to(xl_dtype).reshape(*lead, in_features)
    nones = (None,) * 7
    return grad_x, grad_x_lora, *nones, grad_bias, grad_a, grad_b, None, None, None, None


_lora_linear_op.register_autograd(_lora_backward, setup_context=_lora_setup)


# -- Python entry points -----------------------------------------------------------------------------


def quantize_4bit(w: Tensor, quant_type: str = "nf4", blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """``(packed, absmax)`` of a float tensor on its own device (bitsandbytes' layout)."""
    if not isinstance(w, Tensor):
        raise TypeError(f"[halo.ops.quantize_4bit] w must be a torch tensor, got {type(w).__name__}")
    return torch.ops.halo.quantize_4bit(w, quant_type, int(blocksize))


def dequantize_4bit(
    packed: Tensor,
    absmax: Tensor,
    shape: list[int],
    quant_type: str = "nf4",
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
    nested_absmax: Tensor | None = None,
    nested_offset: float = 0.0,
) -> Tensor:
    """The float tensor of ``shape`` a 4-bit weight holds, on the weight's device."""
    return torch.ops.halo.dequantize_4bit(
        packed,
        absmax,
        nested_absmax,
        float(nested_offset),
        [int(s) for s in shape],
        quant_type,
        int(blocksize),
        dtype,
    )


def matmul_4bit(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    out_features: int,
    quant_type: str = "nf4",
    blocksize: int = 64,
    bias: Tensor | None = None,
    nested_absmax: Tensor | None = None,
    nested_offset: float = 0.0,
    activations: str = "exact",
) -> Tensor:
    """``x W^T (+ bias)`` for a 4-bit ``W`` of shape ``[out_features, x.shape[-1]]``;
    ``activations="int8"`` as :func:`halo.matmul_4bit` (CPU, no backward)."""
    weight = (
        packed,
        absmax,
        nested_absmax,
        float(nested_offset),
        int(out_features),
        quant_type,
        int(blocksize),
    )
    return torch.ops.halo.matmul_4bit(x, *weight, bias, activations)


def lora_linear(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    out_features: int,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    quant_type: str = "nf4",
    blocksize: int = 64,
    bias: Tensor | None = None,
    nested_absmax: Tensor | None = None,
    nested_offset: float = 0.0,
    x_lora: Tensor | None = None,
    fan_in_fan_out: bool = False,
    backend: str = "auto",
) -> Tensor:
    """``x W^T (+ bias) + scaling * (x_lora A^T) B^T`` (``x_lora`` defaults to ``x``); ``W`` is
    stored ``[out, in]``, or ``[in, out]`` with ``fan_in_fan_out``; ``backend`` picks the CPU
    kernels (``halo.backends()``)."""
    weight = (
        packed,
        absmax,
        nested_absmax,
        float(nested_offset),
        int(out_features),
        quant_type,
        int(blocksize),
    )
    adapter = (lora_A, lora_B, float(scaling), bool(fan_in_fan_out), backend)
    return torch.ops.halo.lora_linear(x, x if x_lora is None else x_lora, *weight, bias, *adapter)


# The per-device kernels register themselves on import (after the operators above exist).
from .backends.cpu import ops as _cpu_ops  # noqa: E402,F401
from .backends.cuda import ops as _cuda_ops  # noqa: E402,F401
