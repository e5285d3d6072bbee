"""halo: cheaper LLM fine-tuning, compression and edge inference.

    >>> import halo, numpy as np
    >>> qt = halo.quantize_4bit(np.random.randn(64, 64).astype(np.float32), double_quant=True)
    >>> w = halo.dequantize_4bit(qt)
"""

from .backend import backends, built_with_cuda, resolve_backend
from .quant import QuantizedTensor, dequantize_4bit, quantize_4bit
from . import lora  # halo.lora.merge / unmerge / lora_forward; halo.torch.lora_linear imports torch on demand

__version__ = "0.1.0"

__all__ = [
    "QuantizedTensor",
    "backends",
    "built_with_cuda",
    "dequantize_4bit",
    "lora",
    "quantize_4bit",
    "resolve_backend",
]

from . import hf  # noqa: E402  (torch is imported only when a model is quantized)
from .hwq import HaloQuantized, HardwareModel, halo_quantize, rtn_quantize  # noqa: E402

__all__ += ["HaloQuantized", "HardwareModel", "halo_quantize", "hf", "rtn_quantize"]

from . import io  # noqa: E402  (safetensors reader/writer)
from .merge import merge  # noqa: E402
from .peft_io import read_adapter, write_adapter  # noqa: E402

__all__ += ["io", "merge", "read_adapter", "write_adapter"]

from . import partition, sched  # noqa: E402  (neuron groups, PLR-aware balancer, cluster simulator)

__all__ += ["partition", "sched"]
