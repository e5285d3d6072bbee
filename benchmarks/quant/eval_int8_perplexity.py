"""SmolLM2-135M perplexity with halo's 4-bit layers, exact against int8 activations
(``Linear4bit.activations = "int8"``: x quantized per 8 elements, integer dot products), and
the float model for scale. Windows of held-out text (the standard library's docstrings, n-z,
as benchmarks/hwq uses), every linear layer but lm_head in NF4 (block 64, double quantization).
The exact and int8 passes alternate (exact, int8, exact, int8, ...) so their times compare.

    python benchmarks/quant/eval_int8_perplexity.py [--windows 8] [--seq-len 512]
        [--compute float32,bfloat16] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
import halo  # noqa: E402
from halo.hf import quantize_model  # noqa: E402
from halo.hwq.eval import perplexity, stdlib_docstrings, token_windows  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMOLLM = ROOT / "build" / "models" / "smollm2-135m"


def set_activations(model: torch.nn.Module, mode: str) -> int:
    layers = [m for m in model.modules() if isinstance(m, halo.nn.Linear4bit)]
    for layer in layers:
        layer.activations = mode
    return len(layers)


def timed_perplexity(model, windows, batch_size):
    start = time.perf_counter()
    ppl, _, tokens = perplexity(model, windows, batch_size=batch_size)
    return ppl, tokens, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--compute", default="float32,bfloat16", help="compute dtypes of the 4-bit layers")
    parser.add_argument("--rounds", type=int, default=1, help="exact/int8 passes per compute dtype")
    args = parser.parse_args()
    import transformers

    if not SMOLLM.is_dir():
        print(f"{SMOLLM} is missing: make smollm2 converts it", file=sys.stderr)
        return 1
    tokenizer = transformers.AutoTokenizer.from_pretrained(SMOLLM)
    windows = token_windows(tokenizer, stdlib_docstrings("n", "z"), args.seq_len, args.windows)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"SmolLM2-135M, {args.windows} windows x {args.seq_len} tokens; halo {halo._core.backend.num_threads()} "
        f"threads; int8 kernel {halo._core.quant.matmul_4bit_variant('float32', 8, 576, 576, 64, activations='int8')}"
        f"; load average {load}"
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM, dtype=torch.float32).eval()
    ppl, tokens, seconds = timed_perplexity(model, windows, args.batch_size)
    print(f"  float32 model (no quantization)     perplexity {ppl:.4f}  ({tokens} tokens, {seconds:.1f} s)")
    for name in args.compute.split(","):
        dtype = getattr(torch, name)
        model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM, dtype=torch.float32).eval()
        quantize_model(model, compute_dtype=dtype)
        results = {"exact": [], "int8": []}
        for _ in range(args.rounds):
            for mode in ("exact", "int8"):
                count = set_activations(model, mode)
                results[mode].append(timed_perplexity(model, windows, args.batch_size))
        exact, int8 = results["exact"][0][0], results["int8"][0][0]
        for mode, runs in results.items():
            times = " ".join(f"{r[2]:.1f}" for r in runs)
            print(
                f"  NF4, {name:<8} {mode:<5} activations  perplexity {runs[0][0]:.4f}  ({count} layers; s: {times})"
            )
        print(
            f"  NF4, {name:<8} int8 / exact perplexity: {int8 / exact:.4f} ({100 * (int8 / exact - 1):+.2f} %)"
        )
    print(f"load average at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
