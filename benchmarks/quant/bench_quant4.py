"""4-bit quantize / dequantize throughput: halo vs bitsandbytes (CPU) and vs a
NumPy copy of the same output, all measured in this run.

GB/s counts the bytes each operation must move: quantize reads the float input
and writes codes + absmax; dequantize reads codes + absmax and writes the output;
the copy reads and writes the output-sized array.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import bitsandbytes.functional as F  # noqa: E402

import halo  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096)]


def timeit(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    quick = "--quick" in sys.argv
    reps_fast, reps_slow = (3, 1) if quick else (7, 3)
    print(f"backend {halo.resolve_backend()}, {halo._core.backend.num_threads()} halo threads, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, bitsandbytes {F.__name__.split('.')[0]}")
    header = (f"{'op':<12} {'shape':>11} {'dtype':>8} {'halo ms':>8} {'halo GB/s':>9} {'bnb ms':>8} "
              f"{'x bnb':>6} {'copy GB/s':>9} {'% copy':>6}")
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        n = shape[0] * shape[1]
        w32 = torch.randn(shape) * 0.02
        for dtype in (torch.float32, torch.bfloat16):
            w = w32.to(dtype)
            moved_q = w.element_size() * n + n // 2 + 4 * (n // 64)
            t_halo = timeit(lambda: halo.quantize_4bit(w), reps_fast)
            t_bnb = timeit(lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4"), reps_slow)
            name = str(dtype).replace("torch.", "")
            print(f"{'quantize':<12} {'x'.join(map(str, shape)):>11} {name:>8} {t_halo * 1e3:8.1f} "
                  f"{moved_q / t_halo / 1e9:9.2f} {t_bnb * 1e3:8.1f} {t_bnb / t_halo:6.1f} {'':>9} {'':>6}")
        qt = halo.quantize_4bit(w32)
        packed, state = F.quantize_4bit(w32, blocksize=64, quant_type="nf4")
        for dtype in (torch.float32, torch.bfloat16):
            out_bytes = n * (4 if dtype == torch.float32 else 2)
            moved_d = n // 2 + 4 * (n // 64) + out_bytes
            name = str(dtype).replace("torch.", "")
            t_halo = timeit(lambda: halo.dequantize_4bit(qt, dtype=name), reps_fast)
            state.dtype = dtype
            t_bnb = timeit(lambda: F.dequantize_4bit(packed, state), reps_slow)
            src = np.ones(out_bytes // 4, dtype=np.float32)
            t_copy = timeit(lambda: src.copy(), reps_fast)  # allocates its output, as dequantize does
            copy_gbs = 2 * out_bytes / t_copy / 1e9
            halo_gbs = moved_d / t_halo / 1e9
            print(f"{'dequantize':<12} {'x'.join(map(str, shape)):>11} {name:>8} {t_halo * 1e3:8.1f} {halo_gbs:9.2f} "
                  f"{t_bnb * 1e3:8.1f} {t_bnb / t_halo:6.1f} {copy_gbs:9.2f} {100 * halo_gbs / copy_gbs:6.0f}")
            # Into a reused buffer: no page faults on either side.
            out = torch.empty(shape, dtype=dtype)
            dst = np.empty_like(src)
            t_into = timeit(lambda: halo.dequantize_4bit(qt, out=out), reps_fast)
            t_copyto = timeit(lambda: np.copyto(dst, src), reps_fast)
            into_gbs = moved_d / t_into / 1e9
            copyto_gbs = 2 * out_bytes / t_copyto / 1e9
            print(f"{'  into out=':<12} {'x'.join(map(str, shape)):>11} {name:>8} {t_into * 1e3:8.1f} {into_gbs:9.2f} "
                  f"{t_bnb * 1e3:8.1f} {t_bnb / t_into:6.1f} {copyto_gbs:9.2f} {100 * into_gbs / copyto_gbs:6.0f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
