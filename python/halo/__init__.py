"""halo: cheaper LLM fine-tuning, compression and edge inference.

    >>> import halo, numpy as np
    >>> qt = halo.quantize_4bit(np.random.randn(64, 64).astype(np.float32), double_quant=True)
    >>> w = halo.dequantize_4bit(qt)

One subpackage per area, as in the C++ tree (``include/halo/<area>``):

- ``halo.quant``: 4-bit NF4/FP4 in bitsandbytes' layout (``quantize_4bit``... are re-exported here).
- ``halo.lora``: adapter math; ``halo.lora.merge_checkpoint`` (``halo.merge``) merges an adapter
  into a sharded checkpoint in bounded memory.
- ``halo.io``: safetensors files and PEFT adapter folders (``halo.read_adapter``...).
- ``halo.gguf``: llama.cpp's GGUF files, export and import (``halo.export_gguf``...).
- ``halo.hwq``: the HALO hardware-aware quantizer (``halo.halo_quantize``...).
- ``halo.sched``: neuron groups (``halo.sched.partition``) and the PLR-aware balancer.
- ``halo.edge``: the edge runtime (plan, model split, root, worker, group store, CLI).
- torch-facing, loaded on first use (importing halo does not import torch): ``halo.ops`` (the
  torch operators, kernels registered per device in ``halo.backends``), ``halo.nn``
  (Linear4bit), ``halo.optim`` (8-bit AdamW), ``halo.hf`` (transformers / PEFT drop-in, the
  QLoRA recipe, distributed checks).

The flat module names of earlier releases (``halo.edge_root``, ``halo.gguf_export``,
``halo.qlora``, ``halo.torch``...) still import: each is the module it moved to.
"""

from __future__ import annotations

import importlib
import sys

from . import gguf, hf, io, lora, sched
from ._moved import MovedModules
from .backend import backends, built_with_cuda, kernels, resolve_backend
from .gguf import export_gguf, import_gguf
from .hwq import HaloQuantized, HardwareModel, halo_quantize, rtn_quantize
from .io import read_adapter, write_adapter
from .lora.merge_checkpoint import merge
from .quant import QuantizedTensor, dequantize_4bit, matmul_4bit, matmul_4bit_transposed, quantize_4bit
from .sched import partition

__version__ = "0.1.0"

# Areas loaded on first use (torch, or the edge runtime), by their names as attributes of halo.
_LAZY_AREAS = ("distributed", "edge", "nn", "ops", "optim", "qlora", "torch")  # moved ones via MOVED_MODULES

# Where each module of the flat layout went.
MOVED_MODULES = {
    "halo.distributed": "halo.hf.distributed",
    "halo.edge_cli": "halo.edge.cli",
    "halo.edge_link": "halo.edge.link",
    "halo.edge_model": "halo.edge.model",
    "halo.edge_plan": "halo.edge.plan",
    "halo.edge_policy": "halo.edge.policy",
    "halo.edge_root": "halo.edge.root",
    "halo.edge_store": "halo.edge.store",
    "halo.edge_store_cli": "halo.edge.store_cli",
    "halo.edge_worker": "halo.edge.worker",
    "halo.gguf_arch": "halo.gguf.arch",
    "halo.gguf_check": "halo.gguf.check",
    "halo.gguf_cli": "halo.gguf.cli",
    "halo.gguf_export": "halo.gguf.export",
    "halo.gguf_import": "halo.gguf.importer",
    "halo.gguf_run": "halo.gguf.run",
    "halo.gguf_vocab": "halo.gguf.vocab",
    "halo.hf_4bit": "halo.hf.quantizer",
    "halo.hwq_cli": "halo.hwq.cli",
    "halo.hwq_eval": "halo.hwq.eval",
    "halo.hwq_plots": "halo.hwq.plots",
    "halo.merge_cli": "halo.lora.merge_cli",
    "halo.partition": "halo.sched.partition",
    "halo.peft_io": "halo.io.adapter",
    "halo.peft_layers": "halo.hf.peft_layers",
    "halo.qlora": "halo.hf.qlora",
    "halo.torch": "halo.lora.autograd",
}


# ``import halo.merge`` (the module of the flat layout) must not replace the function halo.merge.
sys.modules.setdefault("halo.merge", sys.modules["halo.lora.merge_checkpoint"])
if not any(isinstance(f, MovedModules) for f in sys.meta_path):
    sys.meta_path.append(MovedModules(MOVED_MODULES))


def __getattr__(name: str):
    if name in _LAZY_AREAS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'halo' has no attribute {name!r}")


__all__ = [
    "HaloQuantized",
    "HardwareModel",
    "QuantizedTensor",
    "backends",
    "built_with_cuda",
    "dequantize_4bit",
    "edge",
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
