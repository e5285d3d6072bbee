"""Hugging Face integration.

- Drop-in 4-bit loading (``quantizer``): :class:`HaloConfig` for ``from_pretrained``,
  :func:`quantize_model`, bitsandbytes checkpoints without bitsandbytes.
- PEFT's LoRA on halo's 4-bit layers (``peft_layers``).
- The QLoRA recipe the example, the demo and the benchmark run (``qlora``) and the checks of a
  ``torch.distributed`` set-up (``distributed``).

These import torch and transformers, so they load on first use: importing halo does not import
torch. ``halo_quantize_model`` and ``compute_sensitivity`` (the HALO quantizer on a whole model)
live in :mod:`halo.hwq` and are re-exported here, where they have always been reachable.
"""

from __future__ import annotations

import importlib

from ..hwq.hf import LayerReport, ModelReport, compute_sensitivity, halo_quantize_model

_LAZY = {
    "HaloConfig": "quantizer",
    "HaloHfQuantizer": "quantizer",
    "auto_compute_dtype": "quantizer",
    "load_bnb_checkpoint": "quantizer",
    "quantize_model": "quantizer",
    "LoraLinear4bit": "peft_layers",
    "PeftLinear4bit": "peft_layers",
    "add_lora_layers": "peft_layers",
    "register_lora": "peft_layers",
}
_SUBMODULES = ("distributed", "peft_layers", "qlora", "quantizer")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'halo.hf' has no attribute {name!r}")


__all__ = ["LayerReport", "ModelReport", "compute_sensitivity", "halo_quantize_model", *_LAZY]
