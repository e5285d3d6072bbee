"""Group loading under a memory budget: SmolLM2-135M in 4-bit from a group store, one process.

For budgets of 100/50/25/10 % of the model's group weights, and for every mode, measures per
decode token: latency, bytes read from disk (this process's /proc/self/io read_bytes: the
loader thread and page faults included), groups missing at their deadline, next-token
agreement and perplexity against the all-resident run (same 4-bit weights, nothing missing).

Modes (halo.edge.store): predict (loader + semantic predictor; a missing group is compensated
with zero by default, --compensation predictor uses the plan's estimate instead), static (loader with static importance only), demand (no loader:
a missing group is read synchronously; the load-on-demand baseline), mmap (the whole file
mapped, the kernel pages it in, page cache capped at the budget by dropping the least
recently used groups: the llama.cpp --mmap baseline); resident is the reference.

Before every run the store file's pages are dropped from the page cache with
posix_fadvise(DONTNEED) and the cached fraction is checked with mincore(2), so every read is
a real disk read. Runs are interleaved (all configurations, then again) and repeated;
figures are min and median over repeats of each run's median per-token time.

    python benchmarks/edge/bench_group_loading.py [--tokens 16] [--repeats 3] [--json out.json]

The plan (predictors) is made once with halo.edge.make_plan (about 20 minutes on a loaded
2-core machine) and cached under build/edge-bench/.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from halo.edge.model import default_heads_per_group, read_spec
from halo.edge.plan import docstring_text, make_plan, tokenize
from halo.edge.store import StreamedLocal, budget_text, build_store

ROOT = Path(__file__).resolve().parents[2]

_libc = ctypes.CDLL(None, use_errno=True)


def cached_fraction(path: Path) -> float:
    """Fraction of the file's pages in the page cache (mincore(2) on a fresh mapping)."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        vec = (ctypes.c_ubyte * pages)()
        try:
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / max(pages, 1)


def drop_cache(path: Path) -> None:
    """Drops the file's pages from the page cache (only this file: drop_caches would empty
    the cache of everyone on this shared machine)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def one_run(args, mode: str, budget: float | None, ids: list[int], tokens: int | None = None) -> dict:
    drop_cache(args.store)
    cached = cached_fraction(args.store)
    t0 = time.perf_counter()
    plan = args.plan if mode in ("predict", "static") else None
    with StreamedLocal(
        args.model,
        args.store,
        plan=plan,
        budget=budget,
        mode=mode,
        window_exchanges=args.window_exchanges,
        read_bandwidth=args.read_mbps * 1e6,
        lookahead=args.lookahead,
        compensation=args.compensation,
    ) as s:
        setup = time.perf_counter() - t0
        prefill = args.prompt_tokens
        start = s.stats()
        s.forward(ids[:prefill], 0)  # prefill: also brings the stores to their steady state
        before = s.stats()
        io0, cpu0 = read_bytes(), time.process_time()
        times, nll, top = [], [], []
        import torch

        tokens = args.tokens if tokens is None else tokens
        for i in range(tokens):
            pos = prefill + i
            t = time.perf_counter()
            logits = s.forward([ids[pos]], pos)
            times.append(time.perf_counter() - t)
            logp = torch.log_softmax(logits[-1].double(), dim=-1)
            nll.append(-float(logp[ids[pos + 1]]))
            top.append(int(torch.argmax(logits[-1])))
        io1, cpu1 = read_bytes(), time.process_time()
        after = s.stats()
    missing = after["missing"] - before["missing"]
    computed = after["computed"] - before["computed"]
    prefill_missing = before["missing"] - start["missing"]
    prefill_total = prefill_missing + before["computed"] - start["computed"]
    return {
        "mode": mode,
        "budget": budget,
        "budget_bytes": after["budget"],
        "held_bytes": after["held_bytes"],
        "cached_before": cached,
        "setup_s": setup,
        "token_s": statistics.median(times),
        "times": times,
        "cpu_per_token_s": (cpu1 - cpu0) / tokens,
        "disk_bytes_per_token": (io1 - io0) / tokens,
        "store_bytes_per_token": (after["bytes_read"] - before["bytes_read"]) / tokens,
        "missing_fraction": missing / (missing + computed) if missing + computed else 0.0,
        "prefill_missing_fraction": prefill_missing / prefill_total if prefill_total else 0.0,
        "nll": nll,
        "argmax": top,
        "peak_resident": after["peak_resident_bytes"],
    }


def ensure_inputs(args) -> None:
    args.store.parent.mkdir(parents=True, exist_ok=True)
    spec = read_spec(args.model)
    if not args.store.exists():
        print(f"building the group store {args.store} ...", flush=True)
        build_store(
            args.model, args.store, group_size=args.group_size, heads_per_group=default_heads_per_group(spec)
        )
    if not args.plan.exists():
        print(f"making the plan {args.plan} (calibration and predictors; slow) ...", flush=True)
        make_plan(args.model, 1, out=args.plan, group_size=args.group_size)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "build/models/smollm2-135m")
    p.add_argument("--store", type=Path, default=ROOT / "build/edge-bench/smollm2-g128.halogrp")
    p.add_argument("--plan", type=Path, default=ROOT / "build/edge-bench/smollm2-1w.json")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--budgets", default="100,50,25,10", help="percent of the model's group bytes")
    p.add_argument("--modes", default="predict,static,demand,mmap")
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--tokens", type=int, default=16, help="decode tokens measured per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window-exchanges", type=int, default=4)
    p.add_argument("--lookahead", type=int, default=1)
    p.add_argument(
        "--read-mbps",
        type=float,
        default=0.0,
        help="cap the store's reads at this many MB/s (emulates a slower disk; mmap is not capped); 0: none",
    )
    p.add_argument("--compensation", choices=("zero", "predictor"), default="zero")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    if not (args.model / "config.json").exists():
        print(f"skipped: no model at {args.model} (run `make model`)")
        return 0
    ensure_inputs(args)
    text = docstring_text("n", "z", max_words=4 * (args.prompt_tokens + args.tokens) + 200)
    ids = tokenize(args.model, text)[: args.prompt_tokens + args.tokens + 1]
    budgets = [float(b) / 100.0 for b in args.budgets.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    configs = [("resident", None)] + [(m, b) for b in budgets for m in modes]
    results: dict[tuple[str, float | None], list[dict]] = {c: [] for c in configs}
    print(
        f"SmolLM2 group store {args.store.name}: {args.store.stat().st_size / 2**20:.1f} MiB; "
        f"{args.prompt_tokens}-token prefill, {args.tokens} decode tokens, {args.repeats} repeats",
        flush=True,
    )
    one_run(args, "resident", None, ids[: args.prompt_tokens + 3], tokens=2)  # warm-up, not counted
    for r in range(args.repeats):
        for mode, budget in configs:
            res = one_run(args, mode, budget, ids)
            results[(mode, budget)].append(res)
            print(
                f"  repeat {r} {mode:8s} {'' if budget is None else f'{budget:.0%}':>4s}: "
                f"{res['token_s'] * 1e3:7.1f} ms/token, {res['disk_bytes_per_token'] / 2**20:6.2f} MiB/token read, "
                f"missing {res['missing_fraction']:.1%}, cached before {res['cached_before']:.1%}",
                flush=True,
            )
    ref = results[("resident", None)][0]
    ref_ms = statistics.median(x["token_s"] for x in results[("resident", None)]) * 1e3

    def summary(mode, budget):
        runs = results[(mode, budget)]
        ms = [x["token_s"] * 1e3 for x in runs]
        agree = np.mean([np.mean(np.asarray(x["argmax"]) == np.asarray(ref["argmax"])) for x in runs])
        ppl = math.exp(np.mean([np.mean(x["nll"]) for x in runs]))
        return {
            "mode": mode,
            "budget": budget,
            "budget_mib": (runs[0]["budget_bytes"] or runs[0]["held_bytes"]) / 2**20,
            "ms_min": min(ms),
            "ms_median": statistics.median(ms),
            "cpu_ms": statistics.median(x["cpu_per_token_s"] * 1e3 for x in runs),
            "disk_mib": statistics.median(x["disk_bytes_per_token"] for x in runs) / 2**20,
            "missing": statistics.mean(x["missing_fraction"] for x in runs),
            "prefill_missing": statistics.mean(x["prefill_missing_fraction"] for x in runs),
            "agreement": float(agree),
            "ppl": ppl,
        }

    rows = [summary(*c) for c in configs]
    demand = {row["budget"]: row["ms_median"] for row in rows if row["mode"] == "demand"}
    print()
    print(
        "| mode | budget | ms/token min / median | x resident | demand / this | MiB read/token | missing "
        "(prefill) | agreement | ppl | CPU ms/token |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        b = "all" if row["budget"] is None else f"{row['budget']:.0%} ({row['budget_mib']:.1f} MiB)"
        vs_demand = demand.get(row["budget"])
        speedup = "" if vs_demand is None else f"{vs_demand / row['ms_median']:.2f}"
        print(
            f"| {row['mode']} | {b} | {row['ms_min']:.0f} / {row['ms_median']:.0f} | "
            f"{row['ms_median'] / ref_ms:.2f} | {speedup} | "
            f"{row['disk_mib']:.2f} | {row['missing']:.1%} ({row['prefill_missing']:.1%}) | {row['agreement']:.1%} | {row['ppl']:.2f} | "
            f"{row['cpu_ms']:.0f} |"
        )
    if args.json:
        tmp = args.json.with_name(f".{args.json.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"rows": rows, "runs": {f"{m}@{b}": v for (m, b), v in results.items()}}))
        os.replace(tmp, args.json)
    print(
        f"\nbudgets are of the model's group bytes ({ref['held_bytes'] / 2**20:.1f} MiB); the root's embeddings, "
        f"norms and head stay outside ({budget_text(ref['held_bytes'])} held)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
