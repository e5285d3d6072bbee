"""Where one Trainer step of the QLoRA recipe goes: halo, bitsandbytes + PEFT and the unquantized
base (bf16 weights, PEFT's LoRA) side by side under torch.profiler.

The recipe is examples/qlora.yaml on SmolLM2-135M (build/models/smollm2-135m), LoRA dropout 0,
batch 1, sequences of --seq tokens. Each system runs in its own process: --warmup steps, then
--steps profiled steps (one profiler session per step, from the Trainer's on_step_begin to its
on_step_end). Every operator's self time is put in one row:

- 4-bit forward / 4-bit backward (grad of x): the frozen base's matmul and its input gradient
  (halo: halo::lora_linear's own time, halo::matmul_4bit_grad; bitsandbytes: the base layer's
  forward and MatMul4Bit's backward; base: the bf16 nn.Linear and its backward);
- LoRA: the adapter's products, its PEFT wrapper and their backward;
- checkpoint recompute: every forward operator re-run inside CheckpointFunction's backward;
- attention (rotary, scores, softmax, reshapes), embeddings + lm_head (+ the loss), optimizer
  (step and zero_grad), casts / copies (aten::to, _to_copy, copy_, clone, contiguous), and
  other (norms, MLP activation, gradient clipping, time between operators).

A module's forward is labelled with record_function from hooks; a backward operator takes the
label of the forward operator whose autograd node it runs (matched by sequence number).

    python benchmarks/lora/profile_qlora_step.py [--seq 128] [--steps 2] [--threads N] [--systems halo bnb base]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "build" / "models" / "smollm2-135m"
ROWS = (
    "4-bit forward",
    "4-bit backward (grad x)",
    "LoRA",
    "checkpoint recompute",
    "attention",
    "embeddings + lm_head",
    "optimizer",
    "casts / copies",
    "other",
)
COPIES = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous", "aten::_copy_from"}
CHILD_TIMEOUT_S = 1800


def _label_modules(model, system: str) -> list:
    """record_function labels around the forward of the modules that decide a row."""
    import torch
    from torch.autograd.profiler import record_function

    handles = []

    def label(module, name: str) -> None:
        def pre(mod, args):
            scope = record_function(name)
            scope.__enter__()
            mod._halo_scopes = [*getattr(mod, "_halo_scopes", []), scope]

        def post(mod, args, out):
            mod._halo_scopes.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        kind = type(module).__name__
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            label(module, "L:lora_layer")
        elif leaf in ("lora_A", "lora_B", "lora_dropout") or ".lora_A." in name or ".lora_B." in name:
            label(module, "L:lora")
        elif leaf == "base_layer":
            label(module, "L:base")
        elif kind.endswith("Attention"):
            label(module, "L:attention")
        elif leaf in ("embed_tokens", "lm_head") or kind.endswith("ForCausalLM"):
            label(module, "L:head")
        elif kind.endswith("RMSNorm") or kind.endswith("MLP") or kind.endswith("Model"):
            label(module, "L:other")
    del torch
    return handles


def _ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def _forward_row(label: str, event, system: str) -> str:
    if label == "L:lora_layer":
        # halo's fused op: its own time is the 4-bit matmul (C++ kernel, no aten op inside), the aten
        # products under it are the adapter's; PEFT's wrappers (bnb, base) are LoRA time
        if system == "halo" and any(a.name.startswith("halo::") for a in _ancestors(event)):
            return "LoRA" if event.name.startswith("aten::") else "4-bit forward"
        return "LoRA"
    return {
        "L:base": "4-bit forward",
        "L:lora": "LoRA",
        "L:attention": "attention",
        "L:head": "embeddings + lm_head",
    }.get(label, "other")


def classify(events, system: str) -> dict:
    """Self CPU time (us) per row over the profiler's events."""
    forward_label = {}  # sequence number -> (label, event) of the forward op that made the node
    for event in events:
        if event.sequence_nr is None or event.sequence_nr < 0:
            continue
        chain = list(_ancestors(event))
        if any(a.name.startswith("autograd::engine::evaluate_function") for a in chain):
            labels = []
            for a in chain:
                if a.name.startswith("autograd::engine::evaluate_function"):
                    break
                if a.name.startswith("L:"):
                    labels.append(a.name)
            if not labels:
                continue
        else:
            labels = [a.name for a in chain if a.name.startswith("L:")]
        if labels and event.sequence_nr not in forward_label:
            forward_label[event.sequence_nr] = (labels[0], event)
    rows: dict = defaultdict(float)
    for event in events:
        us = event.self_cpu_time_total
        if us <= 0:
            continue
        row = None
        backward_node = None
        for a in _ancestors(event):
            if a.name.startswith("Optimizer."):
                row = "optimizer"
                break
            if a.name.startswith("L:"):
                recompute = any("CheckpointFunctionBackward" in b.name for b in _ancestors(a))
                row = "checkpoint recompute" if recompute else _forward_row(a.name, event, system)
                break
            if a.name.startswith("autograd::engine::evaluate_function"):
                backward_node = a
                break
        if row is None and backward_node is not None:
            if "CheckpointFunctionBackward" in backward_node.name:
                row = "checkpoint recompute"
            else:
                label, fwd = forward_label.get(backward_node.sequence_nr, ("", None))
                inside_grad = any(b.name.startswith("halo::matmul_4bit_grad") for b in _ancestors(event))
                if label == "L:lora_layer" and system == "halo":
                    row = "4-bit backward (grad x)" if inside_grad else "LoRA"
                else:
                    row = _forward_row(label, fwd if fwd is not None else event, system)
                    if row == "4-bit forward":
                        row = "4-bit backward (grad x)"
        if row is None:
            row = "other"
        if event.name in COPIES and row != "checkpoint recompute":
            row = "casts / copies"
        rows[row] += us
    return dict(rows)


def child(system: str, seq: int, warmup: int, steps: int) -> None:
    import torch
    import transformers
    from halo.hf.qlora import load_model, load_recipe, make_dataset, train

    recipe = load_recipe(ROOT / "examples" / "qlora.yaml")
    recipe["model"] = str(MODEL)
    torch.manual_seed(0)
    model, tokenizer = load_model(recipe, system, lora_dropout=0.0, seed=0)
    _label_modules(model, system)
    data = make_dataset(tokenizer, ROOT / recipe["data"], max_length=seq, pad_to=seq)
    totals: dict = defaultdict(float)
    walls: list = []

    class Profile(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.step = 0
            self.prof = None
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.step >= warmup:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            wall = time.perf_counter() - self.start
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                walls.append(wall)
                for row, us in classify(self.prof.events(), system).items():
                    totals[row] += us
                self.prof = None
            self.step += 1

    train(
        model,
        data,
        recipe,
        system,
        callbacks=[Profile()],
        max_steps=warmup + steps,
        logging_steps=1,
        warmup_steps=2,
        output_dir=str(ROOT / "build" / "profile_qlora" / system),
        seed=42,
        disable_tqdm=True,
    )
    wall_ms = 1000 * sum(walls) / len(walls)
    rows = {row: totals.get(row, 0.0) / 1000 / len(walls) for row in ROWS}
    # time the profiler did not see inside an operator or a label: Python between them
    rows["other"] += max(0.0, wall_ms - sum(rows.values()))
    print(json.dumps({"system": system, "seq": seq, "wall_ms": wall_ms, "rows_ms": rows}))


def run_child(system: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        system,
        "--seq",
        str(args.seq),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), HALO_NUM_THREADS=str(args.threads))
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{system} run failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def table(results: list) -> str:
    names = [r["system"] for r in results]
    head = "| ms per step | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---:|" * len(names)]
    for row in ROWS:
        lines.append(f"| {row} | " + " | ".join(f"{r['rows_ms'][row]:.0f}" for r in results) + " |")
    lines.append("| **step (wall)** | " + " | ".join(f"**{r['wall_ms']:.0f}**" for r in results) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per system (averaged)")
    parser.add_argument(
        "--threads", type=int, default=0, help="threads per run (torch and halo; default: their own)"
    )
    parser.add_argument(
        "--systems", nargs="+", default=["halo", "bnb", "base"], choices=["halo", "bnb", "base"]
    )
    parser.add_argument("--child", choices=["halo", "bnb", "base"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.seq, args.warmup, args.steps)
        return 0
    if not (MODEL / "config.json").is_file():
        print(f"profile_qlora_step: no model at {MODEL} (run `make model`)", file=sys.stderr)
        return 2
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs ({' '.join(wanted)}), "
        f"load average {os.getloadavg()[0]:.2f}, threads {args.threads or 'default'}, seq {args.seq}, {args.steps} profiled steps after "
        f"{args.warmup} warm-up",
        flush=True,
    )
    results = [run_child(system, args) for system in args.systems]
    print(table(results))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
