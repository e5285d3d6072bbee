"""4-bit quantize / dequantize throughput: halo vs bitsandbytes (CPU) and vs a
NumPy copy of the same output, measured interleaved in this run.

GB/s counts the bytes each operation must move: quantize reads the float input
and writes codes + absmax; dequantize reads codes + absmax and writes the output;
the copy reads and writes the output-sized array. Times are min/median in ms.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import bitsandbytes.functional as F  # noqa: E402
import halo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from timing import interleaved  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096)]


def row(op: str, shape, name: str, halo_t, bnb_t, moved: float, copy_t=None, copy_bytes: float = 0.0) -> str:
    gbs = moved / halo_t.min / 1e9
    text = (
        f"{op:<14} {'x'.join(map(str, shape)):>11} {name:>8} {halo_t.ms():>13} {gbs:9.2f} {bnb_t.ms():>15} "
        f"{bnb_t.min / halo_t.min:6.1f}"
    )
    if copy_t is not None:
        copy_gbs = copy_bytes / copy_t.min / 1e9
        text += f" {copy_gbs:9.2f} {100 * gbs / copy_gbs:6.0f}"
    return text


def main() -> int:
    quick = "--quick" in sys.argv
    repeats = 3 if quick else 7
    print(
        f"backend {halo.resolve_backend()}, {halo._core.backend.num_threads()} halo threads, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; times min/median ms of {repeats}, "
        "interleaved"
    )
    header = (
        f"{'op':<14} {'shape':>11} {'dtype':>8} {'halo ms':>13} {'halo GB/s':>9} {'bnb ms':>15} "
        f"{'x bnb':>6} {'copy GB/s':>9} {'% copy':>6}"
    )
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        n = shape[0] * shape[1]
        w32 = torch.randn(shape) * 0.02
        for dtype in (torch.float32, torch.bfloat16):
            w = w32.to(dtype)
            moved = w.element_size() * n + n // 2 + 4 * (n // 64)
            t = interleaved(
                {
                    "halo": lambda w=w: halo.quantize_4bit(w),
                    "bnb": lambda w=w: F.quantize_4bit(w, blocksize=64, quant_type="nf4"),
                },
                repeats,
            )
            print(row("quantize", shape, str(dtype)[6:], t["halo"], t["bnb"], moved))
        qt = halo.quantize_4bit(w32)
        packed, state = F.quantize_4bit(w32, blocksize=64, quant_type="nf4")
        for dtype in (torch.float32, torch.bfloat16):
            out_bytes = n * (4 if dtype == torch.float32 else 2)
            moved = n // 2 + 4 * (n // 64) + out_bytes
            name = str(dtype)[6:]
            state.dtype = dtype
            src = np.ones(out_bytes // 4, dtype=np.float32)
            out = torch.empty(shape, dtype=dtype)
            dst = np.empty_like(src)
            t = interleaved(
                {
                    "halo": lambda name=name: halo.dequantize_4bit(qt, dtype=name),
                    "bnb": lambda: F.dequantize_4bit(packed, state),
                    "copy": lambda src=src: src.copy(),  # allocates its output, as dequantize does
                    "halo_out": lambda out=out: halo.dequantize_4bit(qt, out=out),
                    "copyto": lambda dst=dst, src=src: np.copyto(dst, src),
                },
                repeats,
            )
            print(row("dequantize", shape, name, t["halo"], t["bnb"], moved, t["copy"], 2 * out_bytes))
            print(row("  into out=", shape, name, t["halo_out"], t["bnb"], moved, t["copyto"], 2 * out_bytes))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
