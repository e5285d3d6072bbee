"""LoRA: the adapter math (``linear``: forward, backward, dropout masks, merge and unmerge of one
weight), torch autograd over it (``autograd``, loaded on first use: it imports torch), and the
streaming merge of an adapter into a sharded checkpoint (``merge_checkpoint``, the ``halo merge``
command). Mirrors ``include/halo/lora``.
"""

from .linear import MergeReport, dropout_mask, lora_backward, lora_forward, lora_scaling, merge, unmerge

__all__ = ["MergeReport", "dropout_mask", "lora_backward", "lora_forward", "lora_scaling", "merge", "unmerge"]
