"""QLoRA on SmolLM2-135M with transformers' Trainer: one process against two DDP processes
(torchrun, gloo) on this machine's cores.

The recipe is examples/qlora.yaml's (NF4 + double quant, r=16 on all projections, gradient
checkpointing, paged 8-bit AdamW) with batch 1 per process: one process with all the cores
as threads against N processes with cores/N threads each, so both use the whole machine.
A DDP step trains N samples, so samples/s is the comparable rate. Runs alternate (1, N, N, 1,
...); each reports steps/s (first step excluded), samples/s and every rank's peak RSS
(ru_maxrss); the table gives min / median over the repeats.

    python benchmarks/lora/bench_distributed.py [--procs 2] [--seq 128] [--steps 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "build" / "models" / "smollm2-135m"
CHILD_TIMEOUT_S = 3 * 3600


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            flags = next(line for line in info if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))))


def child(seq: int, steps: int, results: Path) -> None:
    """Trains, then writes this rank's figures to RESULTS/rank{N}.json (not stdout: torchrun's
    ranks share it, and their lines can interleave)."""
    import torch
    from halo.qlora import load_model, load_recipe, make_dataset, train

    recipe = load_recipe(ROOT / "examples" / "qlora.yaml")
    recipe["model"] = str(ROOT / recipe["model"])
    torch.manual_seed(0)
    model, tokenizer = load_model(recipe, "halo", lora_dropout=0.0, seed=0)
    data = make_dataset(tokenizer, ROOT / recipe["data"], max_length=seq, pad_to=seq)
    rank = int(os.environ.get("RANK", "0"))
    run = train(
        model,
        data,
        recipe,
        "halo",
        max_steps=steps,
        logging_steps=1,
        warmup_steps=2,
        output_dir=str(ROOT / "build" / "bench_distributed" / f"rank{rank}"),
        seed=42,
        save_strategy="no",
        report_to=[],
    )
    figures = {
        "rank": rank,
        "world": int(os.environ.get("WORLD_SIZE", "1")),
        "step_seconds": run.step_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    part = results / f"rank{rank}.json.part"
    part.write_text(json.dumps(figures))
    part.replace(results / f"rank{rank}.json")


def read_results(results: Path) -> list[dict]:
    """The figures every rank of a --child run wrote to RESULTS, by rank."""
    ranks = [json.loads(f.read_text()) for f in sorted(results.glob("rank*.json"))]
    return sorted(ranks, key=lambda r: r["rank"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs: int, seq: int, steps: int) -> list[dict]:
    cores = os.cpu_count() or 1
    threads = max(1, cores // procs)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), HALO_NUM_THREADS=str(threads))
    env.pop("WORLD_SIZE", None)
    with tempfile.TemporaryDirectory(prefix="bench_distributed.") as results:
        tail = [__file__, "--child", "--seq", str(seq), "--steps", str(steps), "--results", results]
        if procs == 1:
            cmd = [sys.executable, *tail]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
            cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *tail]
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=env, check=False, timeout=CHILD_TIMEOUT_S
        )
        ranks = read_results(Path(results))
    if out.returncode != 0 or len(ranks) != procs:
        raise RuntimeError(f"{procs}-process run failed:\n{out.stderr[-3000:]}")
    return ranks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.results is None or not args.results.is_dir():
            parser.error(f"--child needs --results FOLDER, an existing folder (got {args.results})")
        child(args.seq, args.steps, args.results)
        return 0
    if not (MODEL / "config.json").is_file():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_model.py"), "--out", str(MODEL)], check=True
        )
    print(f"CPU: {os.cpu_count()} cores; flags: {cpu_flags()}", flush=True)
    samples: dict[int, list[float]] = {1: [], args.procs: []}
    steps: dict[int, list[float]] = {1: [], args.procs: []}
    rss: dict[int, list[float]] = {1: [], args.procs: []}
    for repeat in range(args.repeats):
        order = (1, args.procs) if repeat % 2 == 0 else (args.procs, 1)
        for procs in order:
            ranks = run(procs, args.seq, args.steps)
            times = ranks[0]["step_seconds"][1:]
            rate = len(times) / max(sum(times), 1e-9)
            steps[procs].append(rate)
            samples[procs].append(rate * procs)
            rss[procs].extend(r["peak_rss_mib"] for r in ranks)
            per_rank = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in ranks)
            print(
                f"  repeat {repeat}, {procs} process(es): {rate:.3f} steps/s, {rate * procs:.3f} samples/s, "
                f"peak RSS per rank {per_rank} MiB",
                flush=True,
            )
    one, many = 1, args.procs
    med = {p: statistics.median(v) for p, v in samples.items()}
    print(
        f"seq {args.seq}, {args.steps} steps, batch 1 per process: samples/s 1 process "
        f"{med[one]:.3f} (min {min(samples[one]):.3f}), {many} processes {med[many]:.3f} "
        f"(min {min(samples[many]):.3f}): {med[many] / med[one]:.2f}x median; steps/s "
        f"{statistics.median(steps[one]):.3f} vs {statistics.median(steps[many]):.3f}; peak RSS per rank "
        f"{statistics.median(rss[one]):.0f} vs {statistics.median(rss[many]):.0f} MiB",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
