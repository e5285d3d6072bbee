"""Loading a 4-bit checkpoint once for a distributed run (``halo.hf.load_on_rank0``: rank 0 reads
it, the others build on the meta device and receive it by broadcast, as accelerate's
``cpu_ram_efficient_loading``) against every rank loading it with ``from_pretrained``, for
tests/python/test_distributed.py.

Every rank compares the two models bit for bit (state dict, buffers, 4-bit settings, tied
weights, a forward), then trains a few LoRA steps on each under FSDP (FSDP1 with a float
``quant_storage``, FSDP2 with uint8) and compares the losses. Rank 0 writes every rank's findings.

    torchrun --nproc_per_node 2 tests/python/dist_load.py --model DIR --out r.json [--quant-storage float32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_train


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def differences(a, b) -> list[str]:
    """What differs between two loaded models, bit for bit: names of tensors or settings."""
    from halo.nn import Linear4bit

    found = []
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        found.append(f"state-dict keys {sorted(sa.keys() ^ sb.keys())}")
    tensors = [(k, sa[k], sb[k]) for k in sa.keys() & sb.keys()]
    buffers_b = dict(b.named_buffers(remove_duplicate=False))
    tensors += [(f"buffer {k}", v, buffers_b.get(k)) for k, v in a.named_buffers(remove_duplicate=False)]
    for name, x, y in tensors:
        if y is None or x.dtype != y.dtype or x.shape != y.shape or not torch.equal(_bytes(x), _bytes(y)):
            found.append(name)
    layers_b = dict(b.named_modules())
    for name, m in a.named_modules():
        if isinstance(m, Linear4bit):
            n = layers_b[name]
            for key in (
                "quant_type",
                "blocksize",
                "double_quant",
                "nested_offset",
                "original_dtype",
                "_quantized",
            ):
                if getattr(m, key) != getattr(n, key):
                    found.append(f"{name}.{key}")
            if type(m.weight) is not type(n.weight) or m.weight.requires_grad != n.weight.requires_grad:
                found.append(f"{name}.weight class")
    tied = [m.lm_head.weight is m.model.embed_tokens.weight for m in (a, b)]
    if tied != [b.config.tie_word_embeddings] * 2:
        found.append(f"tied embedding {tied}")
    ids = dist_train.batch(0)
    with torch.no_grad():
        if not torch.equal(_bytes(a(input_ids=ids).logits), _bytes(b(input_ids=ids).logits)):
            found.append("logits")
    return found


def train(model, quant_storage: str, steps: int = 3) -> list[float]:
    """A few LoRA steps under FSDP (FSDP1 for a float quant_storage, FSDP2 for uint8): the losses."""
    model = dist_train.with_lora(model)
    if quant_storage == "uint8":
        dist_train.shard(model)
    else:
        model = dist_train.shard_fsdp1(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    share = dist_train.GLOBAL_BATCH // dist.get_world_size()
    losses = []
    for step in range(steps):
        ids = dist_train.batch(step)[dist.get_rank() * share : (dist.get_rank() + 1) * share]
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / dist.get_world_size())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a float checkpoint folder (save_pretrained)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quant-storage", default="uint8")
    args = parser.parse_args()

    from halo.hf import HaloConfig, load_on_rank0
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    config = HaloConfig(compute_dtype=torch.float32, quant_storage=getattr(torch, args.quant_storage))
    checkpoint = str((Path(args.model) / "model.safetensors").resolve())
    # The other ranks are given a folder that does not exist: they must not need the checkpoint.
    elsewhere = args.model if dist.get_rank() == 0 else str(Path(args.model) / "not-on-this-machine")
    once = load_on_rank0(elsewhere, quantization_config=config)
    with open("/proc/self/maps") as maps:
        mapped = checkpoint in maps.read()
    every = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config)
    mine = {
        "rank": dist.get_rank(),
        "read_the_checkpoint": mapped,
        "differences": differences(once, every),
        "losses_once": train(once, args.quant_storage),
        "losses_every": train(every, args.quant_storage),
    }
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(everyone))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
