"""Why halo's and bitsandbytes' first logged QLoRA losses differ (0.880 vs 0.897 in
bench_qlora_hf.py): the loss of the same batches, before any update, with the recipe's models
(examples/qlora.yaml, LoRA dropout 0, seed 0) in the recipe's bfloat16 compute and in float32.
Also checks that both hold the same 4-bit weights (dequantized, element by element) and counts
the outputs of the first projection that differ between the two on the same input.

    python benchmarks/lora/first_step_loss.py [--batches 342 0 1 2 3]

(342 is the first batch the Trainer draws with seed 42 from the 400 examples.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[342, 0, 1, 2, 3])
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    import bitsandbytes.functional as bnbf
    import torch
    from halo.hf.qlora import load_model, load_recipe, make_dataset

    recipe = load_recipe(ROOT / "examples" / "qlora.yaml")
    recipe["model"] = str(ROOT / recipe["model"])
    result: dict = {}
    first = "base_model.model.model.layers.0.self_attn.q_proj"
    for compute in ("bfloat16", "float32"):
        recipe["quantization"]["bnb_4bit_compute_dtype"] = compute
        models = {}
        for system in ("halo", "bnb"):
            model, tokenizer = load_model(recipe, system, lora_dropout=0.0, seed=0)
            models[system] = model.train()
        data = make_dataset(tokenizer, ROOT / recipe["data"], max_length=args.seq, pad_to=args.seq)
        seen: list = []
        hook = models["halo"].get_submodule(first).register_forward_hook(lambda m, a, o: seen.append(a[0]))
        for system, model in models.items():
            losses = []
            for i in args.batches:
                with (
                    torch.no_grad(),
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bfloat16"),
                ):
                    losses.append(round(float(model(**{k: v[None] for k, v in data[i].items()}).loss), 6))
            result[f"{system} {compute}"] = losses
        hook.remove()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bfloat16"):
            y_halo = models["halo"].get_submodule(first)(seen[0])
            y_bnb = models["bnb"].get_submodule(first)(seen[0])
        result[f"first projection: outputs differing, {compute}"] = float((y_halo != y_bnb).float().mean())
        if compute == "bfloat16":
            worst = 0.0
            for name, module in models["halo"].named_modules():
                if type(module).__name__ == "Linear4bit":
                    other = models["bnb"].get_submodule(name)
                    w_bnb = bnbf.dequantize_4bit(other.weight.data, other.weight.quant_state).float()
                    worst = max(worst, float((module.dequantize(torch.float32) - w_bnb).abs().max()))
            result["largest |W_halo - W_bnb| (dequantized)"] = worst
        del models
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
