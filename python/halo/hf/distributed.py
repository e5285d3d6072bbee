"""Checks for halo models under ``torch.distributed``: a bad set-up stops with one line naming
what differs, before FSDP fails deep inside its flattening or the ranks hang in a collective.

- :func:`check_fsdp1`: FSDP1 (``FullyShardedDataParallel``, accelerate's FSDP plugin with
  ``fsdp_version: 1``) flattens each wrapped unit into one tensor of one dtype, so the packed
  4-bit weights need ``quant_storage`` set to the float dtype of the other parameters.
- :func:`check_ranks`: every rank runs the same halo version and stores its 4-bit weights the
  same way (one small ``all_gather_object``; a no-op outside a process group).
- :func:`broadcast_model`: every rank takes one rank's model bit for bit, 4-bit quantization
  state included; a rank whose model is on the meta device gets it without ever holding the
  checkpoint (``halo.hf.load_on_rank0``, accelerate's ``cpu_ram_efficient_loading``).

``halo.hf.qlora.train`` runs both when it trains on several processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["broadcast_model", "check_fsdp1", "check_ranks", "quant_storages"]

# What a 4-bit layer holds besides its parameters: tensors that are plain attributes (neither
# parameters nor buffers, so neither FSDP's sync_module_states nor DDP broadcasts them) and settings.
_QUANT_TENSORS = ("weight_absmax", "weight_nested_absmax")
_QUANT_SETTINGS = ("quant_type", "blocksize", "double_quant", "nested_offset", "original_dtype")


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


def _model_tensors(model: nn.Module) -> list[tuple[str, list[tuple[nn.Module, str, str]]]]:
    """Every tensor of ``model`` once, in module order: (name, [(owner, kind, attribute)...]) where
    kind is "param", "buffer" or "attr" (a 4-bit layer's statistics); a tensor shared by several
    modules (tied weights) is one entry with all its owners."""
    from ..nn import Linear4bit

    entries: dict[int, tuple[str, list]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = module_name + "." if module_name else ""
        found = [("param", k, v) for k, v in module._parameters.items()]
        found += [("buffer", k, v) for k, v in module._buffers.items()]
        if isinstance(module, Linear4bit):
            found += [("attr", k, getattr(module, k)) for k in _QUANT_TENSORS]
        for kind, attr, tensor in found:
            if tensor is None:
                continue
            _, owners = entries.setdefault(id(tensor), (prefix + attr, []))
            if not any(o is module and a == attr for o, _, a in owners):
                owners.append((module, kind, attr))
    return list(entries.values())


def _describe(tensor: torch.Tensor) -> str:
    return f"{_name(tensor.dtype)}{list(tensor.shape)}"


@torch.no_grad()
def broadcast_model(model: nn.Module, src: int = 0, group: Any = None, device: Any = "cpu") -> nn.Module:
    """Makes every rank's ``model`` rank ``src``'s, bit for bit: its parameters, buffers (the
    non-persistent ones too) and each :class:`halo.nn.Linear4bit`'s quantization state (the packed
    bytes as stored, in their ``quant_storage`` dtype; the absmax or its 8-bit codes; the nested
    absmax and offset; the settings), which are plain attributes that DDP and FSDP's
    ``sync_module_states`` do not broadcast. A tensor on the meta device (a model built by
    :func:`halo.hf.empty_model`) is first made on ``device``; tied weights stay tied. Every rank
    must hold the same architecture: the names, shapes and dtypes are compared first (one
    ``all_gather_object``), and a difference stops every rank with one line. Call it on every
    rank, before FSDP shards the model. Returns ``model``."""
    fn = "broadcast_model"
    import torch.distributed as dist

    from ..nn import Linear4bit

    if not isinstance(model, nn.Module):
        raise TypeError(f"[{fn}] model must be a torch.nn.Module, got {type(model).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"[{fn}] needs an initialized torch.distributed process group")
    if dist.get_world_size(group) == 1:
        return model
    from torch.distributed.tensor import DTensor

    entries = _model_tensors(model)
    sharded = next((name for name, owners in entries if isinstance(_tensor(owners[0]), DTensor)), None)
    if sharded is not None:
        raise ValueError(
            f"[{fn}] '{sharded}' is already sharded (a DTensor): broadcast the model before FSDP wraps it"
        )
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    mine = (
        [(name, _describe(_tensor(owners[0]))) for name, owners in entries],
        [(name, m.is_quantized) for name, m in layers],
        next((name for name, owners in entries if _tensor(owners[0]).is_meta), None),
    )
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    source = everyone[dist.get_group_rank(group, src) if group is not None else src]
    for rank, theirs in enumerate(everyone):
        _compare(fn, rank, src, theirs, source)
    settings = [[(name, tuple(getattr(m, k) for k in _QUANT_SETTINGS)) for name, m in layers]]
    dist.broadcast_object_list(settings, src=src, group=group)
    for (name, m), (their_name, values) in zip(layers, settings[0]):
        assert name == their_name  # the names were compared above
        for key, value in zip(_QUANT_SETTINGS, values):
            setattr(m, key, value)
    for _, owners in entries:
        tensor = _tensor(owners[0])
        if tensor.is_meta:
            tensor = _materialize(owners, torch.device(device))
        if tensor.is_contiguous():
            dist.broadcast(tensor.detach().reshape(-1).view(torch.uint8), src=src, group=group)
        else:
            staged = tensor.detach().contiguous()
            dist.broadcast(staged.reshape(-1).view(torch.uint8), src=src, group=group)
            tensor.copy_(staged)
    return model


def _tensor(owner: tuple[nn.Module, str, str]) -> torch.Tensor:
    module, kind, attr = owner
    if kind == "param":
        return module._parameters[attr]
    if kind == "buffer":
        return module._buffers[attr]
    return getattr(module, attr)


def _materialize(owners: list, device: torch.device) -> torch.Tensor:
    """An empty tensor on ``device`` in place of a meta one, set on every owner (the same object:
    tied weights stay tied); parameters keep their class (halo's Params4bit) and requires_grad."""
    old = _tensor(owners[0])
    data = torch.empty_like(old, device=device)
    if isinstance(old, nn.Parameter):
        new = type(old)(data, requires_grad=old.requires_grad)
        for attr in ("_is_hf_initialized",):
            if hasattr(old, attr):
                setattr(new, attr, getattr(old, attr))
    else:
        new = data
    for module, kind, attr in owners:
        if kind == "param":
            module._parameters[attr] = new
        elif kind == "buffer":
            module._buffers[attr] = new
        else:
            setattr(module, attr, new)
    return new


def _compare(fn: str, rank: int, src: int, theirs: tuple, source: tuple) -> None:
    """One line naming the first tensor or 4-bit layer where rank ``rank``'s model differs from ``src``'s."""
    (tensors, layers, _), (want_tensors, want_layers, on_meta) = theirs, source
    if on_meta is not None:
        raise RuntimeError(
            f"[{fn}] rank {src}'s '{on_meta}' is on the meta device: rank {src} has nothing to send"
        )
    for (name, what), (want_name, want) in zip(tensors, want_tensors):
        if (name, what) != (want_name, want):
            raise RuntimeError(
                f"[{fn}] rank {rank}'s model differs from rank {src}'s: '{name}' {what} where rank {src} "
                f"has '{want_name}' {want}: build the same model with the same HaloConfig on every rank"
            )
    if len(tensors) != len(want_tensors):
        raise RuntimeError(
            f"[{fn}] rank {rank}'s model holds {len(tensors)} tensors, rank {src}'s {len(want_tensors)}: "
            "build the same model with the same HaloConfig on every rank"
        )
    unquantized = next((name for name, done in want_layers if not done), None)
    if unquantized is not None:
        raise RuntimeError(
            f"[{fn}] rank {src}'s 4-bit layer '{unquantized}' is not quantized: it has nothing to send"
        )
    if [n for n, _ in layers] != [n for n, _ in want_layers]:
        raise RuntimeError(f"[{fn}] rank {rank}'s 4-bit layers differ from rank {src}'s")
