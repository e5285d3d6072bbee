"""The HALO hardware-aware quantizer (arXiv 2502.19662): one matrix (``quantizer``), a whole
Hugging Face model (``hf``), its accuracy evaluation (``eval``), plots (``plots``) and the
``halo quantize`` command (``cli``). Mirrors ``include/halo/hwq``.
"""

from .hardware import HardwareModel
from .hf import LayerReport, ModelReport, compute_sensitivity, halo_quantize_model
from .quantizer import (
    ASSIGNS,
    BASELINES,
    GRIDS,
    MODES,
    PRESETS,
    Cost,
    Estimate,
    HaloQuantized,
    Plan,
    RtnQuantized,
    SparsePart,
    Tile,
    halo_quantize,
    rtn_quantize,
    weighted_error,
)

__all__ = [
    "ASSIGNS",
    "BASELINES",
    "GRIDS",
    "MODES",
    "PRESETS",
    "Cost",
    "Estimate",
    "HaloQuantized",
    "HardwareModel",
    "LayerReport",
    "ModelReport",
    "Plan",
    "RtnQuantized",
    "SparsePart",
    "Tile",
    "compute_sensitivity",
    "halo_quantize",
    "halo_quantize_model",
    "rtn_quantize",
    "weighted_error",
]
