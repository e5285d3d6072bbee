"""`halo merge` against PEFT's merge_and_unload + save_pretrained on a ~0.5 B LLaMA-shaped model.

The model (random init, fixed seed, bfloat16, saved in shards) and a PEFT LoRA adapter
(r=16 on all seven projections) are generated once and cached under build/bench-merge.
Each merge runs in its own subprocess; wall time and that child's peak RSS (wait4) are
measured in the same run. `--small` uses a ~60 M model for a quick check.

The cost of durability: `halo merge` fsyncs every output file and folder before swapping the
output in; `--fsync-reps N` (default 3) times it against `--no-fsync`, interleaved (A, B, A, B...).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "bench-merge"

PEFT_SCRIPT = """
import sys, torch, transformers, peft
base, adapter, out = sys.argv[1:4]
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, max_shard_size="200MB")
"""


def _config(small: bool):
    import transformers

    if small:
        return transformers.LlamaConfig(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=32000,
            tie_word_embeddings=False,
        )
    # 34 layers x 12.85 M + 2 x 32.8 M embeddings = 0.50 B parameters.
    return transformers.LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=34,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        tie_word_embeddings=False,
    )


def prepare(small: bool) -> tuple[Path, Path, int]:
    tag = "small" if small else "0.5b"
    base, adapter = CACHE / f"base-{tag}", CACHE / f"adapter-{tag}"
    stamp = CACHE / f"ready-{tag}"
    if not stamp.exists():
        # In a child: a parent that held the model would lend its RSS to the measured
        # children (ru_maxrss counts the forked image before exec).
        args = [sys.executable, __file__, "--prepare-only"] + (["--small"] if small else [])
        subprocess.run(args, check=True)
    params = sum(os.path.getsize(p) for p in base.glob("*.safetensors")) // 2
    return base, adapter, params


def build_cache(small: bool) -> None:
    tag = "small" if small else "0.5b"
    base, adapter = CACHE / f"base-{tag}", CACHE / f"adapter-{tag}"
    stamp = CACHE / f"ready-{tag}"
    if not stamp.exists():
        import peft
        import torch
        import transformers

        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(adapter, ignore_errors=True)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(small), dtype=torch.bfloat16)
        model.save_pretrained(base, max_shard_size="200MB")
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        torch.manual_seed(1)
        pm = peft.get_peft_model(
            model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
        )
        pm.save_pretrained(adapter)
        CACHE.mkdir(parents=True, exist_ok=True)
        stamp.write_text("ok")


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--small", action="store_true", help="~60 M parameters instead of ~0.5 B")
    ap.add_argument(
        "--fsync-reps", type=int, default=3, help="interleaved fsync / --no-fsync pairs (0: skip)"
    )
    args = ap.parse_args()
    base, adapter, params = prepare(args.small)
    out_halo, out_peft = CACHE / "out-halo", CACHE / "out-peft"
    halo_cmd = [
        sys.executable,
        "-m",
        "halo.cli",
        "merge",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--out",
        str(out_halo),
        "--force",
        "--quiet",
    ]
    peft_cmd = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out_peft)]
    shutil.rmtree(out_peft, ignore_errors=True)
    peft_t, peft_rss = measure(peft_cmd)
    halo_t, halo_rss = measure(halo_cmd)
    largest = max((p.stat().st_size for p in base.glob("*.safetensors")), default=0) / 2**20
    print(
        f"model: {params / 1e9:.2f} B parameters (bfloat16, shards <= 200 MB, largest shard {largest:.0f} MiB); "
        f"adapter r=16 on 7 projections"
    )
    print(f"{'':28}{'wall s':>10}{'peak RSS MiB':>15}")
    print(f"{'PEFT merge_and_unload+save':28}{peft_t:>10.1f}{peft_rss:>15.0f}")
    print(f"{'halo merge':28}{halo_t:>10.1f}{halo_rss:>15.0f}")
    print(
        f"speed-up {peft_t / halo_t:.2f}x (aim >= 3x); memory {halo_rss / peft_rss:.2f} of PEFT (aim <= 0.25)"
    )
    # The two outputs hold the same tensors: spot-check one merged projection.
    import torch
    from safetensors import safe_open

    def tensor(folder: Path, name: str):
        import json

        index = folder / "model.safetensors.index.json"
        file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
        with safe_open(folder / file, "pt") as f:
            return f.get_tensor(name)

    name = "model.layers.0.self_attn.q_proj.weight"
    a, b = tensor(out_halo, name).float(), tensor(out_peft, name).float()
    ulps = ((a - b).abs() / torch.finfo(torch.bfloat16).eps / a.abs().clamp_min(1e-30)).max().item()
    print(f"check {name}: max difference {ulps:.2f} bf16 ulp (relative)")
    if args.fsync_reps > 0:
        fsync_cost(halo_cmd, args.fsync_reps, sum(p.stat().st_size for p in out_halo.iterdir()))


def fsync_cost(halo_cmd: list[str], reps: int, out_bytes: int) -> None:
    """halo merge with fsync (the default) against --no-fsync, interleaved, --force over the last output."""
    import statistics

    times: dict[str, list[float]] = {"fsync": [], "no-fsync": []}
    for _ in range(reps):
        for key, extra in (("fsync", []), ("no-fsync", ["--no-fsync"])):
            os.sync()  # start each run without the previous run's dirty pages
            times[key].append(measure(halo_cmd + extra)[0])
    print(f"durability ({out_bytes / 2**20:.0f} MiB written; {reps} interleaved runs each, min / median):")
    for key, values in times.items():
        print(
            f"  halo merge {'(default, fsync)' if key == 'fsync' else '--no-fsync':<18}"
            f"{min(values):8.2f} s / {statistics.median(values):6.2f} s"
        )
    cost = statistics.median(times["fsync"]) / statistics.median(times["no-fsync"])
    print(f"  fsync costs {cost:.2f}x the wall time of --no-fsync (median over median)")


if __name__ == "__main__":
    main()
