"""One QLoRA training step of a layer (forward + backward, r = 16, dropout 0.05) on a 4-bit
NF4 double-quant base on the CPU: PEFT's LoRA on halo (halo.hf.PeftLinear4bit, the layer a
model loaded with HaloConfig holds, given an adapter by a plain LoraConfig; its forward is
torch.ops.halo.lora_linear) against PEFT's LoRA layer on bitsandbytes' Linear4bit (train mode, what
QLoRA training runs), same weights, adapter and input, measured in one run, interleaved
(PEFT, halo, PEFT, halo, ...), min and median of the repeats.
Gradients: x, lora_A, lora_B (the base is frozen). The compute dtype is x's dtype
(bitsandbytes' compute_dtype); the adapter stays float32, as PEFT keeps it.

    python benchmarks/lora/bench_lora_4bit.py [--quick] [--tokens N ...] [--shape OUT IN] [--dtype D ...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import bitsandbytes as bnb  # noqa: E402 - after the warning filters: its import warns
import halo  # noqa: E402
import halo.hf  # noqa: E402
import halo.hf.peft_layers  # noqa: E402
import halo.nn  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

# (out, in, tokens): a 4096 x 4096 projection at three batch x sequence sizes, and the two
# SmolLM2-135M projection shapes (hidden 576, FFN 1536) at one sequence of 128 tokens.
CASES = [(4096, 4096, 128), (4096, 4096, 512), (4096, 4096, 1024), (576, 576, 128), (1536, 576, 128)]


class _OneLayer(torch.nn.Module):
    # what transformers sets on a model loaded in 4 bits: PEFT then wraps Linear4bit in its
    # bitsandbytes LoRA layer (peft.tuners.lora.bnb.Linear4bit), as QLoRA training does
    is_loaded_in_4bit = True

    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def run_case(out_features, in_features, tokens, dtype, rank, reps):
    torch.manual_seed(0)
    dense = torch.nn.Linear(in_features, out_features, bias=False)
    base = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True
    )
    base.load_state_dict(dense.state_dict())
    base = base.to("cpu")
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["proj"], init_lora_weights=False
    )
    layer = get_peft_model(_OneLayer(base), config).base_model.model.proj
    layer.train()  # eval() would make bitsandbytes repack W for its inference kernel
    # halo: the same bytes in halo.nn.Linear4bit, PEFT's LoRA on it, the same adapter
    ours_base = halo.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype)
    ours_base.load_state_dict(base.state_dict())
    ours_model = halo.hf.peft_layers.add_lora_layers(_OneLayer(ours_base))  # as HaloConfig loads a model
    ours_config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["proj"])
    ours = get_peft_model(ours_model, ours_config).base_model.model.proj
    assert type(ours).__name__ == "PeftLinear4bit"
    with torch.no_grad():
        ours.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
        ours.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    ours.train()
    x = torch.randn(tokens, in_features).to(dtype)
    grad_y = torch.randn(tokens, out_features).to(dtype)

    def run_peft():
        xr = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        layer(xr).backward(grad_y)

    def run_halo():
        xr = x.clone().requires_grad_(True)
        ours.zero_grad(set_to_none=True)
        ours(xr).backward(grad_y)

    # Same numbers without dropout (the two layers draw different masks); train mode kept,
    # as eval() would make bitsandbytes repack W.
    for module in (layer, ours):
        module.lora_dropout["default"].p = 0.0
    with torch.no_grad():
        y_peft = layer(x).float()
        y_halo = ours(x).float()
    for module in (layer, ours):
        module.lora_dropout["default"].p = 0.05
    err = float((y_halo - y_peft).abs().max() / y_peft.abs().max())

    times = {"peft": [], "halo": []}
    run_peft()
    run_halo()
    for _ in range(reps):
        for name, fn in (("peft", run_peft), ("halo", run_halo)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times, err


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, nargs="*", default=None, help="batch x sequence, flattened")
    parser.add_argument("--shape", type=int, nargs=2, default=None, metavar=("OUT", "IN"))
    parser.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    cases = CASES
    if args.shape or args.tokens:
        out_features, in_features = args.shape or (4096, 4096)
        cases = [(out_features, in_features, t) for t in (args.tokens or [512])]
    elif args.quick:
        cases = [(2048, 2048, 128), (576, 576, 128)]
    reps = args.reps or (3 if args.quick else 7)
    print(
        f"QLoRA layer step (forward + backward), NF4 double-quant base, r={args.rank}, dropout 0.05; torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, halo {halo._core.backend.num_threads()} threads, "
        f"backend {halo.resolve_backend()}; {reps} interleaved repeats, times in ms as 'min median'"
    )
    print(
        f"{'shape':>11} {'tokens':>6} {'dtype':>8} {'bnb+PEFT':>17} {'halo':>17} {'x min':>6} {'x med':>6} {'diff':>8}"
    )
    for out_features, in_features, tokens in cases:
        for name in args.dtype:
            dtype = getattr(torch, name)
            times, err = run_case(out_features, in_features, tokens, dtype, args.rank, reps)
            peft, ours = times["peft"], times["halo"]
            print(
                f"{out_features:>5}x{in_features:<5} {tokens:>6} {name:>8} "
                f"{min(peft) * 1e3:8.1f} {statistics.median(peft) * 1e3:8.1f} "
                f"{min(ours) * 1e3:8.1f} {statistics.median(ours) * 1e3:8.1f} "
                f"{min(peft) / min(ours):6.2f} {statistics.median(peft) / statistics.median(ours):6.2f} {err:8.1e}"
            )
    print("x min / x med: bnb+PEFT time / halo time from the minima / the medians (> 1: halo faster);")
    print("diff: max |halo - PEFT| / max |PEFT| of the layer output without dropout")


if __name__ == "__main__":
    main()
