"""4-bit quantization (NF4 / FP4, bitsandbytes' layout) for NumPy arrays and torch tensors.

``tensor`` holds :class:`QuantizedTensor` and the NumPy-facing calls; torch tensors on the fast
path go through the operators of :mod:`halo.ops`. Mirrors ``include/halo/quant``.
"""

from .matmul import matmul_4bit, matmul_4bit_transposed
from .tensor import (
    BLOCKSIZES,
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    QuantizedTensor,
    dequantize_4bit,
    quantize_4bit,
)

__all__ = [
    "BLOCKSIZES",
    "QUANT_TYPES",
    "NESTED_BLOCKSIZE",
    "QuantizedTensor",
    "dequantize_4bit",
    "matmul_4bit",
    "matmul_4bit_transposed",
    "quantize_4bit",
]
