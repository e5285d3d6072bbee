"""What compute_dtype costs on each backend: halo::lora_linear forward + backward on one of
SmolLM2-135M's 576-wide projections (NF4 + double quant, r = 16, 128 tokens), bfloat16 against
float32, each backend in its own process (HALO_BACKEND pins it: avx2 is an AVX2-only CPU's path,
avx512 uses AMX / AVX512-BF16 where the CPU has them). One thread, CPU time per call, the dtypes
interleaved, min / median of the rounds; torch's own ops (the adapter products) run as torch
runs them on this CPU.

    python benchmarks/lora/bench_compute_dtype.py [--rounds 7] [--backends avx512 avx2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(rounds: int) -> None:
    import torch
    from halo.backend import native_bf16_features
    from halo.nn import Linear4bit

    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(576, 576, bias=False), "nf4", None, True, 64)
    lora_a = (torch.randn(16, 576) * 0.02).requires_grad_()
    lora_b = (torch.randn(576, 16) * 0.02).requires_grad_()
    x = torch.randn(128, 576)

    def step(dtype):
        xc = x.to(dtype).requires_grad_()
        y = torch.ops.halo.lora_linear(
            xc, x, base.weight, base.weight_absmax, base.weight_nested_absmax, float(base.nested_offset),
            576, "nf4", 64, None, lora_a, lora_b, 2.0,
        )  # fmt: skip
        y.float().sum().backward()

    times: dict = {"bfloat16": [], "float32": []}
    calls = 20
    for r in range(rounds):
        order = ("bfloat16", "float32") if r % 2 == 0 else ("float32", "bfloat16")
        for name in order:
            dtype = getattr(torch, name)
            step(dtype)
            start = time.process_time()
            for _ in range(calls):
                step(dtype)
            times[name].append((time.process_time() - start) / calls * 1e6)
    print(json.dumps({"native_bf16": native_bf16_features(), "us": times}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--backends", nargs="+", default=["avx512", "avx2"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.rounds)
        return 0
    print(f"load average {os.getloadavg()[0]:.2f}; 1 thread; CPU time per forward + backward call")
    for backend in args.backends:
        env = dict(os.environ, HALO_BACKEND=backend, OMP_NUM_THREADS="1", HALO_NUM_THREADS="1")
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--rounds", str(args.rounds)],
            env=env, capture_output=True, text=True, timeout=1800, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            print(f"{backend}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        result = json.loads(out.stdout.strip().splitlines()[-1])
        us = result["us"]
        bf, fp = statistics.median(us["bfloat16"]), statistics.median(us["float32"])
        print(
            f"backend {backend} (native bf16: {result['native_bf16'] or 'none'}): bfloat16 {bf:.0f} us "
            f"(min {min(us['bfloat16']):.0f}), float32 {fp:.0f} us (min {min(us['float32']):.0f}); "
            f"bfloat16 / float32 = {bf / fp:.2f}"
        )
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
