"""Files: safetensors through halo's C++ reader and writer (``safetensors``) and PEFT adapter
folders (``adapter``). Mirrors ``include/halo/io``.
"""

from .adapter import Adapter, AdapterConfig, LoraModule, read_adapter, write_adapter
from .safetensors import (
    SafetensorsFile,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    load_safetensors,
    open_safetensors,
    save_safetensors,
    to_numpy_bits,
)

__all__ = [
    "Adapter",
    "AdapterConfig",
    "LoraModule",
    "SafetensorsFile",
    "bf16_bits_to_float32",
    "float32_to_bf16_bits",
    "load_safetensors",
    "open_safetensors",
    "read_adapter",
    "save_safetensors",
    "to_numpy_bits",
    "write_adapter",
]
