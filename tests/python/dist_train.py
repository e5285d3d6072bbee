"""A few QLoRA steps on a tiny 4-bit LLaMA, run alone or under ``torchrun`` (gloo), for
tests/python/test_distributed.py.

Every run sees the same global batch per step (4 sequences drawn from a seeded generator);
under N processes rank r trains on its contiguous quarter/half of it, so DDP's averaged
gradients equal the single-process gradient of the whole batch. Rank 0 writes a JSON with the
global loss per step and the LoRA weights after the last step, and optionally a checkpoint
(LoRA weights + optimizer state + step) after ``--save-at`` steps; ``--resume`` starts from one.

    torchrun --nproc_per_node 2 tests/python/dist_train.py --out r.json [--optim adamw8bit]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models

GLOBAL_BATCH = 4
SEQ = 16


def batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 96, (GLOBAL_BATCH, SEQ), generator=generator)


def build(quant_storage: str = "uint8"):
    from halo.hf import quantize_model

    model = tiny_models.llama(seed=0)
    quantize_model(model, compute_dtype=torch.float32, quant_storage=getattr(torch, quant_storage))
    return with_lora(model)


def with_lora(model):
    """PEFT LoRA (r 16) on every projection, in train mode, drawn from seed 1 on every rank."""
    import peft
    from halo.hf import register_lora

    torch.manual_seed(1)  # the same random LoRA init on every rank (B != 0: both factors train)
    config = register_lora(
        # r = 16: every LoRA factor splits over 2 ranks into shards of whole 256-element blocks,
        # so AdamW8bit's blockwise states under FSDP are those of one process.
        peft.LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=tiny_models.LLAMA_TARGETS,
            init_lora_weights=False,
        )
    )
    model = peft.get_peft_model(model, config)
    model.train()
    return model


def make_optimizer(model, optim: str):
    import halo

    params = [p for p in model.parameters() if p.requires_grad]
    if optim == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    else:
        # min_8bit_size 64: the tiny model's LoRA factors (512-2048 elements) take the 8-bit path.
        optimizer = halo.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.01, min_8bit_size=64)
    return optimizer


def lora_state(model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights, whole: FSDP's shards are gathered."""
    from torch.distributed.tensor import DTensor

    def whole(p):
        return p.full_tensor() if isinstance(p, DTensor) else p

    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):  # FSDP1: gather the flat parameters first
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            return {
                name.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                for name, p in model.named_parameters()
                if p.requires_grad
            }
    return {name: whole(p.detach()).clone() for name, p in model.named_parameters() if p.requires_grad}


def _packed_share(model) -> float:
    """The share of the packed 4-bit weight bytes this rank holds (FSDP: about 1 / ranks)."""
    from halo.nn import Linear4bit
    from torch.distributed.tensor import DTensor

    packed = [m.weight for m in model.modules() if isinstance(m, Linear4bit)]
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in packed)
    return local / sum(p.numel() for p in packed)


def shard(model) -> None:
    """FSDP2: every decoder layer, then the rest, sharded over the ranks (4-bit weights included)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def save_sharded(model, optimizer, step: int, folder: str) -> None:
    """torch.distributed.checkpoint: each rank writes its shards of the model (the packed 4-bit
    weights included, with their quantization state) and of the optimizer state. The model's
    state dict is taken as is: torch's get_state_dict resolves every key as an attribute path,
    and bitsandbytes' keys (``weight.absmax``) are not."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {
        "model": model.state_dict(),
        "optim": get_optimizer_state_dict(model, optimizer),
        "step": torch.tensor(step),
    }
    dcp.save(state, checkpoint_id=folder)


def load_sharded(model, optimizer, folder: str) -> int:
    """The inverse of save_sharded, on any number of ranks (DCP reshards on load); returns the step.
    The 4-bit base weights are zeroed first, so they must come from the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from halo.nn import Linear4bit
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, Linear4bit):
                layer.weight.zero_()
                layer.weight_absmax.zero_()
    state = {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optim": get_optimizer_state_dict(model, optimizer),
        "step": torch.tensor(0),
    }
    dcp.load(state, checkpoint_id=folder)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optim"])
    return int(state["step"])


def shard_fsdp1(model):
    """FSDP1 (FullyShardedDataParallel, as accelerate's FSDP plugin wraps): one flat parameter per
    decoder layer and one for the rest, each sharded over the ranks, the original parameters kept
    as views (use_orig_params) so the optimizer holds only the LoRA factors."""
    import functools

    import halo
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    halo.hf.distributed.check_fsdp1(model)
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    return FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True, device_id=device)


def _packed_share_fsdp1(model) -> float:
    """Under FSDP1 with use_orig_params, outside forward each original parameter is a view of this
    rank's part of the flat parameter: the share of the packed bytes held here."""
    from halo.nn import Linear4bit

    modules = [m for m in model.modules() if isinstance(m, Linear4bit)]
    whole = sum((m.out_features * m.in_features + 1) // 2 for m in modules)
    return sum(m.weight.numel() * m.weight.element_size() for m in modules) / whole


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--optim", choices=["adamw", "adamw8bit"], default="adamw")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--resume", default="")
    parser.add_argument(
        "--sharded", action="store_true", help="save/resume with torch.distributed.checkpoint"
    )
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    parser.add_argument("--fsdp1", action="store_true", help="FSDP1 FullyShardedDataParallel instead of DDP")
    parser.add_argument(
        "--quant-storage", default="uint8", help="the dtype the packed 4-bit bytes are stored as"
    )
    parser.add_argument(
        "--mixed-storage-rank",
        type=int,
        default=-1,
        help="this rank stores its packed bytes as uint8 (a bad set-up)",
    )
    parser.add_argument(
        "--pretend-version",
        default="",
        help="RANK:VERSION: that rank reports this halo version (a bad set-up)",
    )
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if GLOBAL_BATCH % world:
        raise SystemExit(f"[dist_train] world size {world} must divide the global batch {GLOBAL_BATCH}")
    torch.set_num_threads(1)

    if args.fsdp1 and (args.resume or args.save_at):
        raise SystemExit("[dist_train] --fsdp1 runs do not save or resume")
    if args.fsdp and (args.resume or args.save_at) and not args.sharded:
        raise SystemExit("[dist_train] --fsdp runs save and resume --sharded")
    if args.pretend_version:
        import halo

        pretend_rank, version = args.pretend_version.split(":", 1)
        if int(pretend_rank) == rank:
            halo.__version__ = version
    storage = "uint8" if rank == args.mixed_storage_rank else args.quant_storage
    model = build(storage)
    if distributed:
        import halo

        halo.hf.distributed.check_ranks(model)  # as halo.hf.qlora.train does: one line on every rank
    initial = lora_state(model)
    start = 0
    if args.resume and not args.sharded:
        saved = torch.load(args.resume, weights_only=False)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(saved["lora"][name])
        start = saved["step"]
    if distributed and args.fsdp:
        shard(model)  # the optimizer below then holds the sharded parameters
        trained = model
    elif distributed and args.fsdp1:
        trained = model = shard_fsdp1(model)
    else:
        trained = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = make_optimizer(model, args.optim)
    packed_share = _packed_share_fsdp1(model) if distributed and args.fsdp1 else _packed_share(model)
    if args.resume and args.sharded:
        start = load_sharded(model, optimizer, args.resume)
    elif args.resume:
        optimizer.load_state_dict(saved["optimizer"])

    losses = []
    share = GLOBAL_BATCH // world
    for step in range(start, args.steps):
        ids = batch(step)[rank * share : (rank + 1) * share]
        optimizer.zero_grad(set_to_none=True)
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        global_loss = loss.detach().clone()
        if distributed:
            dist.all_reduce(global_loss)
            global_loss /= world
        losses.append(float(global_loss))
        if args.save_at and step + 1 == args.save_at and args.sharded:
            save_sharded(model, optimizer, step + 1, args.checkpoint)
        elif args.save_at and step + 1 == args.save_at and rank == 0:
            torch.save(
                {"lora": lora_state(model), "optimizer": optimizer.state_dict(), "step": step + 1},
                args.checkpoint,
            )

    # Every rank must hold the same LoRA weights and optimizer state after the run.
    weights = lora_state(model)
    if distributed:
        for name, value in weights.items():
            gathered = [torch.empty_like(value) for _ in range(world)]
            dist.all_gather(gathered, value)
            if not all(torch.equal(g, gathered[0]) for g in gathered):
                raise SystemExit(f"[dist_train] rank weights differ after training: {name}")
        for state in [] if args.fsdp or args.fsdp1 else optimizer.state.values():  # FSDP: a shard each
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.numel() > 0:
                    gathered = [torch.empty_like(value) for _ in range(world)]
                    dist.all_gather(gathered, value.contiguous())
                    if not all(torch.equal(g, gathered[0]) for g in gathered):
                        raise SystemExit(f"[dist_train] optimizer state '{key}' differs between ranks")
    if rank == 0:
        result = {
            "world": world,
            "packed_share": packed_share,
            "losses": losses,
            "lora": {name: value.flatten().tolist() for name, value in weights.items()},
            "initial": {name: value.flatten().tolist() for name, value in initial.items()},
        }
        Path(args.out).write_text(json.dumps(result))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
