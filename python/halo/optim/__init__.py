"""Optimizers over halo's kernels: 8-bit AdamW with bitsandbytes' blockwise states
(``adamw8bit``). Imports torch. Mirrors ``include/halo/optim``.
"""

from .adamw8bit import BLOCKSIZE, AdamW8bit, PagedAdamW8bit

__all__ = ["BLOCKSIZE", "AdamW8bit", "PagedAdamW8bit"]
