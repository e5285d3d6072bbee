"""LoRA forward + backward on a 4-bit NF4 base (QLoRA's layer) on the CPU:
halo.torch.lora_linear (tile-wise dequantization inside the GEMM) against
bitsandbytes Linear4bit wrapped by PEFT, both measured in this run on the same
weights, adapter and input. Gradients: x, lora_A, lora_B (the base is frozen).

    python benchmarks/lora/bench_lora_4bit.py [--quick] [--tokens N] [--shape OUT IN]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import halo
from halo.torch import lora_linear

# The tiny-model builders are shared with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "python"))
import tiny_models


def timeit(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=None, help="batch x sequence, flattened")
    parser.add_argument("--shape", type=int, nargs=2, default=None, metavar=("OUT", "IN"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    out_features, in_features = args.shape or ((2048, 2048) if args.quick else (4096, 4096))
    tokens = args.tokens or (128 if args.quick else 512)
    reps = args.reps or (2 if args.quick else 3)
    rank, alpha, dropout = args.rank, 2 * args.rank, 0.05

    layer = tiny_models.qlora_layer(in_features, out_features, r=rank, alpha=alpha, dropout=dropout, seed=0)
    base = layer.get_base_layer()
    layer.train()
    qt = halo.QuantizedTensor.from_bnb_state_dict(base.state_dict(), "weight")
    lora_a = layer.lora_A["default"].weight
    lora_b = layer.lora_B["default"].weight
    scaling = layer.scaling["default"]
    a_halo = lora_a.detach().clone().requires_grad_(True)
    b_halo = lora_b.detach().clone().requires_grad_(True)
    x = torch.randn(tokens, in_features)
    grad_y = torch.randn(tokens, out_features)

    def run_peft():
        xr = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        layer(xr).backward(grad_y)

    def run_halo():
        xr = x.clone().requires_grad_(True)
        a_halo.grad = b_halo.grad = None
        lora_linear(xr, qt, a_halo, b_halo, scaling, dropout=dropout, seed=1).backward(grad_y)

    # Same numbers without dropout (the two dropouts draw different masks). The layer stays in
    # train mode: eval() would make bitsandbytes repack W for its bfloat16 inference kernel,
    # which is not what QLoRA training runs.
    peft_dropout = layer.lora_dropout["default"]
    peft_dropout.p = 0.0
    with torch.no_grad():
        y_peft = layer(x)
    peft_dropout.p = dropout
    y_halo = lora_linear(x, qt, lora_a.detach(), lora_b.detach(), scaling, training=False)
    err = float((y_halo - y_peft).abs().max() / y_peft.abs().max())

    flops = (
        2 * 2 * tokens * out_features * in_features
    )  # forward and grad_x base GEMMs (LoRA terms are small)
    t_peft = timeit(run_peft, reps)
    t_halo = timeit(run_halo, reps)

    # Python-visible peak allocation of one halo step (the C++ tile buffers are per thread, ~256 KiB each)
    tracemalloc.start()
    run_halo()
    _, halo_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    print(
        f"LoRA fwd+bwd on an NF4 (double-quant) base [{out_features} x {in_features}], r={rank}, "
        f"{tokens} tokens, dropout {dropout}; torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads, halo {halo._core.backend.num_threads()} threads, backend {halo.resolve_backend()}"
    )
    print(f"max relative difference of the outputs (no dropout): {err:.2e}")
    print(f"{'impl':<26} {'ms/step':>9} {'GFLOP/s':>8}")
    print(f"{'bitsandbytes+PEFT':<26} {t_peft * 1e3:>9.1f} {flops / t_peft / 1e9:>8.1f}")
    print(f"{'halo.torch.lora_linear':<26} {t_halo * 1e3:>9.1f} {flops / t_halo / 1e9:>8.1f}")
    print(f"speed-up halo vs bitsandbytes+PEFT: {t_peft / t_halo:.2f}x")
    w_mib = out_features * in_features * 4 / 2**20
    print(
        f"float copy of W that bitsandbytes materializes per pass: {w_mib:.0f} MiB;"
        f" halo's Python-side peak per step: {halo_peak / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()
