"""Checks for halo models under ``torch.distributed``: a bad set-up stops with one line naming
what differs, before FSDP fails deep inside its flattening or the ranks hang in a collective.

- :func:`check_fsdp1`: FSDP1 (``FullyShardedDataParallel``, accelerate's FSDP plugin with
  ``fsdp_version: 1``) flattens each wrapped unit into one tensor of one dtype, so the packed
  4-bit weights need ``quant_storage`` set to the float dtype of the other parameters.
- :func:`check_ranks`: every rank runs the same halo version and stores its 4-bit weights the
  same way (one small ``all_gather_object``; a no-op outside a process group).

``halo.hf.qlora.train`` runs both when it trains on several processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["check_fsdp1", "check_ranks", "quant_storages"]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quant_storages(model: nn.Module) -> dict[str, torch.dtype]:
    """The dtype each quantized :class:`halo.nn.Linear4bit` of ``model`` stores its packed weight as."""
    from ..nn import Linear4bit

    if not isinstance(model, nn.Module):
        raise TypeError(f"[quant_storages] model must be a torch.nn.Module, got {type(model).__name__}")
    return {
        name: module.weight.dtype
        for name, module in model.named_modules()
        if isinstance(module, Linear4bit) and module.is_quantized
    }


def check_fsdp1(model: nn.Module) -> None:
    """Raises ValueError unless FSDP1 can flatten ``model``'s 4-bit layers with its other
    parameters: every packed weight stored as one float ``quant_storage``, the dtype of the
    other float parameters."""
    fn = "check_fsdp1"
    from ..nn import Linear4bit

    if not isinstance(model, nn.Module):
        raise TypeError(f"[{fn}] model must be a torch.nn.Module, got {type(model).__name__}")
    storages = quant_storages(model)
    if not storages:
        return
    in_bytes = [name for name, dtype in storages.items() if dtype == torch.uint8]
    if in_bytes:
        more = f" and {len(in_bytes) - 1} more" if len(in_bytes) > 1 else ""
        raise ValueError(
            f"[{fn}] FSDP1 flattens each unit into one dtype, but 4-bit layer '{in_bytes[0]}'{more} "
            "stores its packed weight as uint8: load with HaloConfig(quant_storage=<the dtype of the "
            "other parameters>)"
        )
    kinds = {}
    for name, dtype in storages.items():
        kinds.setdefault(dtype, name)
    if len(kinds) > 1:
        found = ", ".join(f"'{name}' {_name(dtype)}" for dtype, name in kinds.items())
        raise ValueError(
            f"[{fn}] the 4-bit layers store their packed weights in different quant_storage dtypes "
            f"({found}); FSDP1 needs one, the dtype of the other parameters"
        )
    storage = next(iter(kinds))
    packed = {id(m.weight) for m in model.modules() if isinstance(m, Linear4bit) and m.is_quantized}
    others = {}
    for name, p in model.named_parameters():
        if id(p) not in packed and p.is_floating_point() and p.dtype != storage:
            others.setdefault(p.dtype, name)
    if others:
        dtype, name = next(iter(others.items()))
        raise ValueError(
            f"[{fn}] the packed 4-bit weights are stored as {_name(storage)} but parameter '{name}' "
            f"is {_name(dtype)}: FSDP1 flattens a unit into one dtype; use quant_storage={_name(dtype)} "
            "or cast the other parameters"
        )


def check_ranks(model: nn.Module | None = None, group: Any = None) -> None:
    """Raises RuntimeError on every rank when the ranks of the process group run different halo
    versions or (given ``model``) store their 4-bit weights in different dtypes. One
    ``all_gather_object`` of a short tuple; does nothing without an initialized process group."""
    fn = "check_ranks"
    import torch.distributed as dist

    import halo

    if not dist.is_available() or not dist.is_initialized():
        return
    storages = "-" if model is None else ",".join(sorted({_name(d) for d in quant_storages(model).values()}))
    mine = (str(halo.__version__), storages)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for rank, (version, stored) in enumerate(everyone):
        if version != everyone[0][0]:
            raise RuntimeError(
                f"[{fn}] rank {rank} runs halo {version}, rank 0 runs halo {everyone[0][0]}: "
                "install the same halo on every machine"
            )
        if stored != everyone[0][1]:
            raise RuntimeError(
                f"[{fn}] rank {rank} stores its packed 4-bit weights as {stored or 'none'}, rank 0 as "
                f"{everyone[0][1] or 'none'}: load with the same HaloConfig(quant_storage=...) on every rank"
            )
