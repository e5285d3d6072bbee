"""The device-independent half of halo's torch kernels: argument checks, shapes, autocast and
the adapter products, around a backend's 4-bit ``matmul``.

``matmul(x2d, weight, out_features, in_features, bias, transposed, backend[, activations])``:
y = x W^T (+ bias), or x W when ``transposed``, for rows x2d in x's dtype (``activations="int8"``:
x quantized per 8 elements, not transposed); ``weight`` is
(packed, absmax, nested_absmax, nested_offset, quant_type, blocksize). backends/cpu/ops.py and
backends/cuda/ops.py pass theirs; the operators themselves are defined in :mod:`halo.ops`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from ..ops import check_activations, check_backend, check_float, check_lora, check_same_device, check_weight


def _no_autocast(device: str):
    """Autocast switched off for the products below; when it is off already (every call outside
    an autocast region) no context is entered: entering one costs more than a small layer's
    product."""
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext()


def _base_matmul(
    matmul,
    x2d: Tensor,
    weight_args: tuple,
    out_features: int,
    bias,
    fan_in_fan_out=False,
    backend="auto",
    activations="exact",
) -> Tensor:
    """x W^T (+ bias) for rows x2d [m, in] in x's dtype, autocast off; W is stored [out, in], or
    [in, out] with ``fan_in_fan_out`` (GPT-2's Conv1D), where x W^T is x times the stored matrix.
    ``activations="int8"`` (stored [out, in] only) quantizes x per 8 elements."""
    in_features = x2d.shape[1]
    with _no_autocast(x2d.device.type):
        if activations != "exact":
            return matmul(
                x2d.contiguous(), weight_args, out_features, in_features, bias, False, backend, activations
            )
        if not fan_in_fan_out:
            return matmul(x2d.contiguous(), weight_args, out_features, in_features, bias, False, backend)
        y = matmul(x2d.contiguous(), weight_args, in_features, out_features, None, True, backend)
        return y if bias is None else y.add_(bias.to(y.dtype))


def _grad_input(
    matmul, grad2d: Tensor, weight_args: tuple, out_features: int, in_features: int, fan_in_fan_out, backend
) -> Tensor:
    """grad_y W for grad rows [m, out]: the input gradient of the frozen 4-bit base."""
    with _no_autocast(grad2d.device.type):
        if not fan_in_fan_out:
            return matmul(grad2d.contiguous(), weight_args, out_features, in_features, None, True, backend)
        return matmul(grad2d.contiguous(), weight_args, in_features, out_features, None, False, backend)


def matmul_composite(matmul, x, packed, absmax, nested_absmax, nested_offset, out_features, *rest) -> Tensor:
    """halo::matmul_4bit's kernel around a backend's ``matmul``; ``rest`` is quant_type, blocksize,
    bias, then activations when it is not the default "exact" (the dispatcher leaves it out)."""
    quant_type, blocksize, bias = rest[:3]
    activations = rest[3] if len(rest) > 3 else "exact"
    fn = "halo::matmul_4bit"
    check_activations(fn, activations)
    check_float(fn, "x", x)
    in_features = x.shape[-1]
    check_weight(fn, packed, absmax, nested_absmax, out_features * in_features, quant_type, blocksize)
    check_same_device(fn, x, packed)
    x2d = x.reshape(-1, in_features)
    args = (packed, absmax, nested_absmax, nested_offset, quant_type, blocksize)
    y = _base_matmul(matmul, x2d, args, out_features, bias, activations=activations)
    return y.reshape(*x.shape[:-1], out_features)


def matmul_grad_composite(
    matmul,
    grad,
    packed,
    absmax,
    nested_absmax,
    nested_offset,
    in_features,
    quant_type,
    blocksize,
    fan_in_fan_out=False,
    backend="auto",
) -> Tensor:
    """halo::matmul_4bit_grad's kernel around a backend's ``matmul``."""
    fn = "halo::matmul_4bit_grad"
    check_float(fn, "grad", grad)
    out_features = grad.shape[-1]
    check_weight(fn, packed, absmax, nested_absmax, out_features * in_features, quant_type, blocksize)
    args = (packed, absmax, nested_absmax, nested_offset, quant_type, blocksize)
    grad2d = grad.reshape(-1, out_features).contiguous()
    check_backend(fn, backend)
    grad_x = _grad_input(matmul, grad2d, args, out_features, in_features, fan_in_fan_out, backend)
    return grad_x.reshape(*grad.shape[:-1], in_features)


def lora_linear_composite(
    matmul,
    x,
    x_lora,
    packed,
    absmax,
    nested_absmax,
    nested_offset,
    out_features,
    quant_type,
    blocksize,
    bias,
    lora_A,
    lora_B,
    scaling,
    fan_in_fan_out=False,
    backend="auto",
    out_dtype=None,
) -> Tensor:
    """halo::lora_linear's kernel around a backend's ``matmul``: the base 4-bit matmul, then
    the adapter in the adapter's dtype, added as PEFT adds it; the result in ``out_dtype``
    (default: x's), so a caller that wants its own dtype back gets it without a round trip."""
    fn = "halo::lora_linear"
    check_float(fn, "x", x)
    in_features = x.shape[-1]
    check_weight(fn, packed, absmax, nested_absmax, out_features * in_features, quant_type, blocksize)
    check_lora(fn, x, x_lora, lora_A, lora_B, out_features, in_features)
    check_same_device(fn, x, packed)
    check_backend(fn, backend)
    x2d = x.reshape(-1, in_features)
    args = (packed, absmax, nested_absmax, nested_offset, quant_type, blocksize)
    y = _base_matmul(matmul, x2d, args, out_features, bias, fan_in_fan_out, backend)
    with torch.autocast(x.device.type, enabled=False):
        hidden = torch.mm(x_lora.reshape(-1, in_features).to(lora_A.dtype), lora_A.t())
        if scaling != 1.0:
            hidden.mul_(scaling)  # on the [m, r] product, not on the [m, out] one
        # y += (scaling * hidden) B^T in the adapter's dtype, one addmm (no separate delta)
        out_dtype = out_dtype or y.dtype
        if y.dtype == hidden.dtype:
            y = y.addmm_(hidden, lora_B.t()).to(out_dtype)
        elif out_dtype == hidden.dtype:
            y = torch.addmm(y.to(hidden.dtype), hidden, lora_B.t())
        else:
            y = torch.addmm(y.to(hidden.dtype), hidden, lora_B.t()).to(out_dtype)
    return y.reshape(*x.shape[:-1], out_features)


def register_matmul_kernels(device: str, matmul) -> None:
    """Registers the operators built around a backend's ``matmul`` (halo::matmul_4bit,
    halo::matmul_4bit_grad, halo::lora_linear) as ``device``'s kernels."""
    for name, composite in (
        ("halo::matmul_4bit", matmul_composite),
        ("halo::matmul_4bit_grad", matmul_grad_composite),
        ("halo::lora_linear", lora_linear_composite),
    ):

        def kernel(*args, _composite=composite):
            return _composite(matmul, *args)

        torch.library.register_kernel(name, device)(kernel)
