"""halo: cheaper LLM fine-tuning, compression and edge inference.

    >>> import halo, numpy as np
    >>> qt = halo.quantize_4bit(np.random.randn(64, 64).astype(np.float32), double_quant=True)
    >>> w = halo.dequantize_4bit(qt)

Areas: 4-bit quantization (this namespace), ``halo.lora`` and ``halo.torch`` (adapter math, autograd),
``halo.io`` / ``halo.merge`` / ``halo.read_adapter`` (safetensors, PEFT adapters, streaming merge),
``halo.halo_quantize`` and ``halo.hf`` (hardware-aware quantizer), ``halo.partition`` and ``halo.sched``
(neuron groups, PLR-aware balancer, cluster simulator), ``halo.gguf`` / ``halo.export_gguf`` /
``halo.import_gguf`` (llama.cpp's GGUF files). ``halo.ops`` (torch operators), ``halo.nn``
(Linear4bit), ``halo.optim`` (8-bit AdamW), ``halo.distributed`` (checks of a distributed set-up)
and ``halo.hf.HaloConfig`` need torch and load on first use: importing halo does not import torch.
"""

from . import gguf, hf, io, lora, partition, sched
from .backend import backends, built_with_cuda, kernels, resolve_backend
from .gguf_export import export_gguf
from .gguf_import import import_gguf
from .hwq import HaloQuantized, HardwareModel, halo_quantize, rtn_quantize
from .merge import merge
from .peft_io import read_adapter, write_adapter
from .quant import QuantizedTensor, dequantize_4bit, matmul_4bit, matmul_4bit_transposed, quantize_4bit

__version__ = "0.1.0"

_TORCH_AREAS = ("distributed", "nn", "ops", "optim", "qlora")


def __getattr__(name: str):
    if name in _TORCH_AREAS:  # torch-based areas load on first use
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'halo' has no attribute {name!r}")


__all__ = [
    "HaloQuantized",
    "HardwareModel",
    "QuantizedTensor",
    "backends",
    "built_with_cuda",
    "dequantize_4bit",
    "export_gguf",
    "gguf",
    "halo_quantize",
    "hf",
    "import_gguf",
    "io",
    "kernels",
    "lora",
    "matmul_4bit",
    "matmul_4bit_transposed",
    "merge",
    "partition",
    "quantize_4bit",
    "read_adapter",
    "resolve_backend",
    "rtn_quantize",
    "sched",
    "write_adapter",
]
