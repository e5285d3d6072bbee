"""QLoRA fine-tuning on halo: the usual Hugging Face recipe (NF4 + double quant, bf16 compute,
LoRA r=16 on every projection, gradient checkpointing, paged 8-bit AdamW, cosine schedule),
with halo in place of bitsandbytes, then a streaming merge with `halo merge`.

    python examples/qlora_finetune.py --config examples/qlora.yaml [--max-steps N]
    accelerate launch --multi_gpu --num_processes 2 examples/qlora_finetune.py ...   # DDP on CPUs/GPUs
    torchrun --nproc_per_node 2 examples/qlora_finetune.py ...                      # the same

(``--multi_gpu`` is accelerate's torchrun launcher; on CPUs the ranks take gloo. Without it, or a
config file, ``accelerate launch`` starts one process on a machine without GPUs.)

What changes against a bitsandbytes script is two lines: ``quantization_config=
halo.hf.HaloConfig.from_bnb(bnb_settings)`` (or ``HaloConfig(...)``) and the optimizer, from
``halo.optim``; the plain ``peft.LoraConfig`` stays.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "qlora.yaml")
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    parser.add_argument("--no-merge", action="store_true", help="stop after saving the adapter")
    args = parser.parse_args(argv)

    from halo.hf.qlora import answer, load_model, load_recipe, make_dataset, train

    recipe = load_recipe(args.config)
    for key in ("model", "data"):
        if not Path(recipe[key]).is_absolute():
            recipe[key] = str(ROOT / recipe[key])
    if not (Path(recipe["model"]) / "config.json").exists():
        print(f"qlora_finetune: no model at {recipe['model']} (run `make model`)", file=sys.stderr)
        return 2
    overrides = {} if args.max_steps is None else {"max_steps": args.max_steps}
    model, tokenizer = load_model(recipe, "halo")
    data = make_dataset(tokenizer, recipe["data"], max_length=int(recipe.get("max_seq_length", 128)))
    question = "What is 17 plus 25?"
    print(f"before: {question} -> {answer(model, tokenizer, question)!r}")
    model.train()
    start = time.perf_counter()
    run = train(model, data, recipe, "halo", **overrides)
    print(
        f"trained {len(run.step_seconds)} steps in {time.perf_counter() - start:.0f} s; "
        f"logged losses: {', '.join(f'{x:.3f}' for x in run.losses)}"
    )
    print(f"after:  {question} -> {answer(model, tokenizer, question)!r}")

    if not _main_process():
        return 0  # under DDP every rank holds the same adapter: rank 0 saves and merges it
    merge = recipe.get("merge", {})
    adapter = ROOT / merge.get("adapter", "build/qlora/adapter")
    model.save_pretrained(adapter)
    print(f"adapter saved to {adapter}")
    if args.no_merge:
        return 0
    out = ROOT / merge.get("out", "build/qlora/merged")
    command = [
        sys.executable,
        "-m",
        "halo.cli",
        "merge",
        "--base",
        recipe["model"],
        "--adapter",
        str(adapter),
        "--out",
        str(out),
        "--dtype",
        merge.get("dtype", "fp16"),
        "--force",
        "--quiet",
    ]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        return result.returncode
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
