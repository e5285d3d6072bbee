"""QLoRA on SmolLM2-135M with transformers' Trainer: one process against two DDP processes
(torchrun, gloo) on this machine's cores.

The recipe is examples/qlora.yaml's (NF4 + double quant, r=16 on all projections, gradient
checkpointing, paged 8-bit AdamW) with batch 1 per process: one process with all the cores
as threads against N processes with cores/N threads each, so both use the whole machine.
A DDP step trains N samples, so samples/s is the comparable rate. Runs alternate (1, N, N, 1,
...); each reports steps/s (first step excluded), samples/s and every rank's peak RSS
(ru_maxrss); the table gives min / median over the repeats.

    python benchmarks/lora/bench_distributed.py [--procs 2] [--seq 128] [--steps 20] [--repeats 2]
    python benchmarks/lora/bench_distributed.py --fsdp ...   # DDP against FSDP2, both on --procs

Peak RSS (VmHWM) counts the pages of the memory-mapped checkpoint each rank touched while
loading; those are page cache the ranks share, so the table also gives the peak right after
loading, how much of it was file-backed, and the anonymous memory at the end.
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


def _status_mib() -> dict[str, float]:
    """This process's memory now (VmRSS, and its anonymous and file-backed parts) and its peak
    (VmHWM), from /proc/self/status, in MiB. File-backed pages (the memory-mapped checkpoint) are
    page cache the ranks share, but every rank's RSS counts them."""
    wanted = {"VmHWM": "peak", "VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
    figures = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in wanted:
                figures[wanted[key]] = int(value.split()[0]) / 1024
    return figures


def _shard_fsdp2(model, root: bool) -> None:
    """FSDP2: fully_shard on every decoder layer (every LoRA factor and 4-bit weight lives in one),
    and with ``root`` on the whole PEFT model as well, which shards the frozen tied embedding too
    (then gathered whole for every forward and backward). The Trainer is then
    kept from wrapping it in DDP as well: accelerate turns its FSDP plugin on only for GPU-like
    devices and wraps CPU ranks in DDP, which cannot hold the sharded (DTensor) parameters."""
    import accelerate
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    if root:
        fully_shard(model)
    prepare_model = accelerate.Accelerator.prepare_model

    def keep_fsdp2(self, module, *args, **kwargs):
        if module is not model:
            return prepare_model(self, module, *args, **kwargs)
        # What prepare_model does besides wrapping: bf16 autocast around forward (the Trainer's
        # bf16 is accelerate's mixed precision), and keeping the model for unwrap and save.
        if self.native_amp:
            from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

            autocast = get_mixed_precision_context_manager(self.native_amp, self.autocast_handler)
            module.forward = convert_outputs_to_fp32(autocast(module.forward))
        self._models.append(module)
        return module

    accelerate.Accelerator.prepare_model = keep_fsdp2


def child(seq: int, steps: int, results: Path, fsdp: str = "") -> None:
    """Trains, then writes this rank's figures to RESULTS/rank{N}.json (not stdout: torchrun's
    ranks share it, and their lines can interleave)."""
    import torch
    from halo.hf.qlora import load_model, load_recipe, make_dataset, train

    recipe = load_recipe(ROOT / "examples" / "qlora.yaml")
    recipe["model"] = str(ROOT / recipe["model"])
    torch.manual_seed(0)
    model, tokenizer = load_model(recipe, "halo", lora_dropout=0.0, seed=0)
    loaded = _status_mib()
    if fsdp:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        _shard_fsdp2(model, root=fsdp == "root")
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
        "losses": run.losses,
        "fsdp": fsdp,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loaded": loaded,
        "end": _status_mib(),
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


def run(procs: int, seq: int, steps: int, fsdp: str = "") -> list[dict]:
    cores = os.cpu_count() or 1
    threads = max(1, cores // procs)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), HALO_NUM_THREADS=str(threads))
    env.pop("WORLD_SIZE", None)
    with tempfile.TemporaryDirectory(prefix="bench_distributed.") as results:
        tail = [__file__, "--child", "--seq", str(seq), "--steps", str(steps), "--results", results]
        tail += ["--fsdp", fsdp] if fsdp else []
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


def _spread(values: list[float], fmt: str = ".0f") -> str:
    return f"{min(values):{fmt}} / {statistics.median(values):{fmt}}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--fsdp",
        nargs="?",
        const="layers",
        default="",
        choices=("layers", "root", "both"),
        help="compare DDP with FSDP2 on --procs processes: fully_shard per decoder layer (layers, the "
        "default), also on the whole model (root), or both setups",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.results is None or not args.results.is_dir():
            parser.error(f"--child needs --results FOLDER, an existing folder (got {args.results})")
        child(args.seq, args.steps, args.results, args.fsdp)
        return 0
    if args.procs < 2:
        parser.error(f"--procs must be at least 2, got {args.procs}")
    if not (MODEL / "config.json").is_file():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_model.py"), "--out", str(MODEL)], check=True
        )
    print(f"CPU: {os.cpu_count()} cores; flags: {cpu_flags()}", flush=True)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    n = args.procs
    names = {"layers": "FSDP2 per layer", "root": "FSDP2 per layer + root"}
    if args.fsdp:
        kinds = ["layers", "root"] if args.fsdp == "both" else [args.fsdp]
        setups = [(f"{n} DDP", n, ""), *((f"{n} {names[k]}", n, k) for k in kinds)]
    else:
        setups = [("1 process", 1, ""), (f"{n} DDP", n, "")]
    figures: dict[str, dict[str, list[float]]] = {
        name: {"samples": [], "steps": [], "peak": [], "load": [], "anon": []} for name, _, _ in setups
    }
    for repeat in range(args.repeats):
        for name, procs, fsdp in setups if repeat % 2 == 0 else setups[::-1]:
            ranks = run(procs, args.seq, args.steps, fsdp)
            times = ranks[0]["step_seconds"][1:]
            rate = len(times) / max(sum(times), 1e-9)
            got = figures[name]
            got["steps"].append(rate)
            got["samples"].append(rate * procs)
            got["peak"].extend(r["peak_rss_mib"] for r in ranks)
            got["load"].extend(r["loaded"]["peak"] for r in ranks)
            got["anon"].extend(r["end"]["anon"] for r in ranks)
            got.setdefault("losses", ranks[0]["losses"])
            per_rank = ", ".join(
                f"{r['peak_rss_mib']:.0f} (after loading {r['loaded']['peak']:.0f}, of it "
                f"{r['loaded']['file']:.0f} file-backed; anonymous at the end {r['end']['anon']:.0f})"
                for r in ranks
            )
            print(
                f"  repeat {repeat}, {name}: {rate:.3f} steps/s, {rate * procs:.3f} samples/s, "
                f"peak RSS per rank {per_rank} MiB",
                flush=True,
            )
    print(f"seq {args.seq}, {args.steps} steps, batch 1 per process, {args.repeats} repeats (min / median):")
    for name, got in figures.items():
        print(
            f"  {name}: samples/s {_spread(got['samples'], '.3f')}, steps/s {_spread(got['steps'], '.3f')}; "
            f"per rank: peak RSS {_spread(got['peak'])} MiB, after loading {_spread(got['load'])} MiB, "
            f"anonymous at the end {_spread(got['anon'])} MiB",
            flush=True,
        )
    a = setups[0][0]
    for b, _, _ in setups[1:]:
        ratio = statistics.median(figures[b]["samples"]) / statistics.median(figures[a]["samples"])
        peak = statistics.median(figures[b]["peak"]) / statistics.median(figures[a]["peak"])
        print(
            f"  {b} against {a}: {ratio:.2f}x samples/s, {peak:.2f}x peak RSS per rank (medians)", flush=True
        )
        if args.fsdp:  # the same global batch and start: the runs must train alike
            gap = max(abs(x - y) for x, y in zip(figures[a]["losses"], figures[b]["losses"]))
            print(f"    largest logged-loss difference from {a}: {gap:.2e}", flush=True)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
