"""CUDA kernels of ``torch.ops.halo.*`` (the operators are defined in :mod:`halo.ops`).

Tensors stay on the GPU: halo's CUDA entry points take device pointers and the current
stream (src/cuda/device_ops.cu and the matmul's CUDA entry); a build without CUDA raises
instead of moving data to the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _core
from ... import ops as _ops
from .. import common


def _stream(t: Tensor) -> int:
    return int(torch.cuda.current_stream(t.device).cuda_stream)


def _scales(absmax: Tensor, nested_absmax: Tensor | None, nested_offset: float) -> Tensor:
    if nested_absmax is None:
        return absmax.contiguous()
    code = torch.from_numpy(_core.quant.dynamic_map()).to(absmax.device)
    scale = nested_absmax.repeat_interleave(_ops.NESTED_BLOCKSIZE)[: absmax.numel()]
    return code[absmax.long()] * scale + float(nested_offset)  # two roundings, as bitsandbytes


def _matmul(x2d: Tensor, weight, out_features, in_features, bias, transposed, backend, activations="exact"):
    """y = x W^T (+ bias), or x W when ``transposed``, in x's dtype (``backend`` names CPU kernels:
    unused here; int8 activations are CPU only)."""
    if activations != "exact":
        raise ValueError(
            f"[halo::matmul_4bit] activations={activations!r} runs on the CPU only; x is on {x2d.device}"
        )
    packed, absmax, nested_absmax, nested_offset, quant_type, blocksize = weight
    rows = x2d.shape[0]
    y = torch.empty(rows, in_features if transposed else out_features, dtype=x2d.dtype, device=x2d.device)
    scales = _scales(absmax, nested_absmax, nested_offset)
    bias_t = None if bias is None else bias.to(x2d.dtype).contiguous()
    _core.quant.matmul_4bit_device(
        x2d.data_ptr(),
        _ops.FLOAT_NAMES[x2d.dtype],
        rows,
        packed.contiguous().data_ptr(),
        scales.data_ptr(),
        quant_type,
        blocksize,
        out_features,
        in_features,
        0 if bias_t is None else bias_t.data_ptr(),
        y.data_ptr(),
        transposed,
        _stream(x2d),
    )
    return y


@torch.library.register_kernel("halo::quantize_4bit", "cuda")
def _quantize_4bit(w: Tensor, quant_type: str, blocksize: int):
    n = _ops.check_quantize("halo::quantize_4bit", w, quant_type, blocksize)
    w = w.contiguous()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    _core.cuda.quantize_4bit(
        w.data_ptr(),
        _ops.FLOAT_NAMES[w.dtype],
        n,
        quant_type,
        blocksize,
        packed.data_ptr(),
        absmax.data_ptr(),
        _stream(w),
    )
    return packed, absmax


@torch.library.register_kernel("halo::dequantize_4bit", "cuda")
def _dequantize_4bit(packed, absmax, nested_absmax, nested_offset, shape, quant_type, blocksize, dtype):
    numel = _ops.check_dequantize(
        "halo::dequantize_4bit", packed, absmax, nested_absmax, shape, quant_type, blocksize, dtype
    )
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    scales = _scales(absmax, nested_absmax, nested_offset)
    _core.cuda.dequantize_4bit(
        packed.contiguous().data_ptr(),
        scales.data_ptr(),
        numel,
        quant_type,
        blocksize,
        out.data_ptr(),
        _ops.FLOAT_NAMES[dtype],
        _stream(out),
    )
    return out.view(list(shape))


common.register_matmul_kernels("cuda", _matmul)


@torch.library.register_kernel("halo::double_quantize_absmax", "cuda")
def _double_quantize_absmax(absmax: Tensor, threads: int):
    # The statistics are one float per block: computed on the host by the CPU kernel (the same
    # summation order as the CPU path), the results moved back to the device.
    codes, nested, offset = torch.ops.halo.double_quantize_absmax(absmax.cpu(), threads)
    return codes.to(absmax.device), nested.to(absmax.device), offset.to(absmax.device)
