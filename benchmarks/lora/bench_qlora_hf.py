"""QLoRA training on SmolLM2-135M with transformers' Trainer: halo vs bitsandbytes + PEFT, and
the bound both are measured against.

Same model, data, seed and recipe (examples/qlora.yaml: NF4 + double quant, compute dtype "auto"
(bf16 on this kind of CPU), r=16 on all projections, gradient checkpointing, 8-bit paged AdamW,
cosine schedule), batch 1, LoRA dropout 0 so the loss curves are comparable. The bound ("base")
is the same step with the base left unquantized in the compute dtype and PEFT's own LoRA (the
Trainer's paged 8-bit AdamW from bitsandbytes): the time a 4-bit library cannot beat by much.
Each run is its own process (so its peak RSS is its own); the systems run in rotating order
and the figures are min / median over the repeats: steps/s (first step excluded), peak RSS
(ru_maxrss), the largest gap between halo's and bitsandbytes' loss curves.

    python benchmarks/lora/bench_qlora_hf.py [--seq 128 512] [--steps 50] [--repeats 2] [--no-bound]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "build" / "models" / "smollm2-135m"  # examples/qlora.yaml's model
CHILD_TIMEOUT_S = 3 * 3600  # one training run; far above a normal one, so only a hang reaches it


def prepare_model() -> None:
    """Makes the model folder (`make model`) when it is missing."""
    if not (MODEL / "config.json").is_file():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_model.py"), "--out", str(MODEL)], check=True
        )


def child(system: str, seq: int, steps: int) -> None:
    import torch
    from halo.hf.qlora import load_model, load_recipe, make_dataset, train

    recipe = load_recipe(ROOT / "examples" / "qlora.yaml")
    recipe["model"] = str(ROOT / recipe["model"])
    torch.manual_seed(0)
    model, tokenizer = load_model(recipe, system, lora_dropout=0.0, seed=0)
    data = make_dataset(tokenizer, ROOT / recipe["data"], max_length=seq, pad_to=seq)
    run = train(
        model,
        data,
        recipe,
        system,
        max_steps=steps,
        logging_steps=1,
        warmup_steps=2,
        output_dir=str(ROOT / "build" / "bench_qlora" / system),
        seed=42,
    )
    print(
        json.dumps(
            {
                "system": system,
                "seq": seq,
                "losses": run.losses,
                "step_seconds": run.step_seconds,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def run_child(system: str, seq: int, steps: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, __file__, "--child", system, "--seq", str(seq), "--steps", str(steps)]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=env, check=False, timeout=CHILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise RuntimeError(
            f"{system} run (seq {seq}, {steps} steps) did not finish within {CHILD_TIMEOUT_S} s and was "
            f"killed:\n{tail}"
        ) from None
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{system} run failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def summarize(seq: int, runs: list) -> dict:
    by = {s: [r for r in runs if r["system"] == s] for s in ("halo", "bnb", "base")}
    by = {s: rs for s, rs in by.items() if rs}
    rates = {s: [len(r["step_seconds"][1:]) / sum(r["step_seconds"][1:]) for r in rs] for s, rs in by.items()}
    rss = {s: [r["peak_rss_mib"] for r in rs] for s, rs in by.items()}
    gaps = [
        max(abs(a - b) for a, b in zip(h["losses"], b_["losses"])) for h in by["halo"] for b_ in by["bnb"]
    ]
    result = {
        "seq": seq,
        "steps": len(by["halo"][0]["losses"]),
        "steps_per_s": {s: {"min": min(v), "median": statistics.median(v)} for s, v in rates.items()},
        "speedup_median": statistics.median(rates["halo"]) / statistics.median(rates["bnb"]),
        "speedup_min_pair": min(rates["halo"]) / max(rates["bnb"]),
        "peak_rss_mib": {s: {"min": min(v), "median": statistics.median(v)} for s, v in rss.items()},
        "max_loss_gap": max(gaps),
        "loss_curves": {s: rs[0]["losses"] for s, rs in by.items()},
    }
    if "base" in rates:
        result["halo_over_bound_median"] = statistics.median(rates["base"]) / statistics.median(rates["halo"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--no-bound", action="store_true", help="skip the unquantized-base runs")
    parser.add_argument("--child", choices=["halo", "bnb", "base"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.seq[0], args.steps)
        return 0
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("bench_qlora_hf: the baseline needs bitsandbytes (pip install bitsandbytes)", file=sys.stderr)
        return 2
    prepare_model()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    print(f"{os.cpu_count()} CPUs ({' '.join(wanted)}), load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for seq in args.seq:
        runs = []
        for repeat in range(args.repeats):
            systems = ["halo", "bnb"] if args.no_bound else ["halo", "bnb", "base"]
            shift = repeat % len(systems)
            for system in systems[shift:] + systems[:shift]:
                run = run_child(system, seq, args.steps)
                rate = len(run["step_seconds"][1:]) / max(sum(run["step_seconds"][1:]), 1e-9)
                print(
                    f"  seq {seq} repeat {repeat} {system:>4}: {rate:.3f} steps/s, peak RSS "
                    f"{run['peak_rss_mib']:.0f} MiB, loss {run['losses'][0]:.3f} -> {run['losses'][-1]:.3f}, "
                    f"load average {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
                runs.append(run)
        summary = summarize(seq, runs)
        results.append(summary)
        s = summary
        print(
            f"seq {seq}, {s['steps']} steps, batch 1: halo {s['steps_per_s']['halo']['median']:.3f} steps/s "
            f"(min {s['steps_per_s']['halo']['min']:.3f}) vs bnb+PEFT {s['steps_per_s']['bnb']['median']:.3f} "
            f"(min {s['steps_per_s']['bnb']['min']:.3f}): {s['speedup_median']:.2f}x median; peak RSS halo "
            f"{s['peak_rss_mib']['halo']['median']:.0f} MiB vs bnb {s['peak_rss_mib']['bnb']['median']:.0f} MiB; "
            f"largest loss gap {s['max_loss_gap']:.4f}",
            flush=True,
        )
        if "base" in s["steps_per_s"]:
            print(
                f"seq {seq} bound (unquantized base, PEFT LoRA): {s['steps_per_s']['base']['median']:.3f} steps/s "
                f"(min {s['steps_per_s']['base']['min']:.3f}); halo's step is {s['halo_over_bound_median']:.2f}x "
                f"the bound's (median)",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
