"""The QLoRA steps of dist_train.py through accelerate: ``Accelerator.prepare`` wraps the tiny
4-bit LLaMA as the launch config says (tests/python/accelerate_fsdp.yaml: the FSDP plugin,
FSDP1), for test_distributed's ``accelerate launch`` case.

    accelerate launch --config_file tests/python/accelerate_fsdp.yaml \\
        tests/python/accelerate_train.py --out r.json --quant-storage float32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_train


def wrap_as_the_plugin_says(model, device):
    """FSDP1 as ``Accelerator.prepare`` wraps a model, from the FSDP plugin of the launch config
    (accelerate launch hands it over as FSDP_* variables). accelerate turns its FSDP plugin on
    only for GPU-like devices (DistributedType.FSDP is never set for MULTI_CPU), so CPU ranks
    apply it here; on GPUs ``accelerator.prepare`` does it."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullyShardedDataParallel

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 1:
        raise SystemExit(
            f"[accelerate_train] the config asks for FSDP version {plugin.fsdp_version}; "
            "this script wraps FSDP1"
        )
    plugin.set_auto_wrap_policy(model)
    return FullyShardedDataParallel(
        model,
        sharding_strategy=plugin.sharding_strategy,
        auto_wrap_policy=plugin.auto_wrap_policy,
        use_orig_params=plugin.use_orig_params,
        sync_module_states=plugin.sync_module_states,
        backward_prefetch=plugin.backward_prefetch,
        forward_prefetch=plugin.forward_prefetch,
        limit_all_gathers=plugin.limit_all_gathers,
        device_id=device,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quant-storage", default="float32")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import halo
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # Without GPUs the ranks must be told to use the CPU (gloo), as halo.hf.qlora tells the Trainer
    # (use_cpu): accelerate's `use_cpu: true` config would start one process, not torchrun's ranks.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.set_num_threads(1)
    rank, world = accelerator.process_index, accelerator.num_processes
    model = dist_train.build(args.quant_storage)
    halo.hf.distributed.check_ranks(model)
    on_cpu = accelerator.distributed_type == DistributedType.MULTI_CPU
    fsdp1 = os.environ.get("ACCELERATE_USE_FSDP") == "true" and os.environ.get("FSDP_VERSION", "1") == "1"
    if fsdp1:
        halo.hf.distributed.check_fsdp1(model)
    if fsdp1 and on_cpu:
        model = wrap_as_the_plugin_says(model, torch.device("cpu"))
    else:
        model = accelerator.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = accelerator.prepare(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01))

    losses = []
    share = dist_train.GLOBAL_BATCH // world
    for step in range(args.steps):
        ids = dist_train.batch(step)[rank * share : (rank + 1) * share]
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        losses.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
    weights = dist_train.lora_state(model)
    if accelerator.is_main_process:
        result = {
            "world": world,
            "wrapped": type(model).__name__,
            "packed_share": dist_train._packed_share_fsdp1(model) if fsdp1 else 1.0,
            "losses": losses,
            "lora": {name: value.flatten().tolist() for name, value in weights.items()},
        }
        Path(args.out).write_text(json.dumps(result))
    accelerator.end_training()


if __name__ == "__main__":
    main()
