"""``halo.nn.Linear4bit``: a drop-in for ``bitsandbytes.nn.Linear4bit`` on halo's ops.

The layer holds its 4-bit weight in bitsandbytes' layout as torch tensors (so
``.to(device)`` moves it and CUDA stays on the GPU): ``weight`` is the packed
uint8 parameter ``[(n + 1) // 2, 1]`` (frozen), ``weight_absmax`` /
``weight_nested_absmax`` are plain tensors. With ``quant_storage`` a float dtype (as
bitsandbytes' ``bnb_4bit_quant_storage``) the same bytes are stored viewed as that dtype,
``[ceil(bytes / itemsize), 1]``, zero-padded, so that FSDP1 can flatten them with the float
parameters of a unit; ``layer.packed`` is always the uint8 view the kernels take. Its state
dict has exactly the keys, dtypes, shapes and bytes of a bitsandbytes ``Linear4bit`` (``weight``, ``bias``,
``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so
checkpoints move both ways. ``layer.quantized`` gives the weight as a
:class:`halo.QuantizedTensor` (NumPy views, no copy, CPU only).

Before it is quantized the layer holds a float ``weight`` ``[out, in]`` like
``nn.Linear`` (this is how transformers builds it on the meta device before
loading); assigning a float state dict or calling :meth:`quantize_` packs it.

Long module: one class, ``Linear4bit``, whose loading paths (float weights, bitsandbytes
state dicts, quant_storage views, FSDP shards) all write the same packed state.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _core
from . import ops as _ops  # registers torch.ops.halo.*
from .formats import check_bnb4_format
from .quant import QuantizedTensor

__all__ = ["Linear4bit"]

_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_DTYPE_NAMES = _ops.FLOAT_NAMES
QUANT_STORAGES = (torch.uint8, *_DTYPE_NAMES)


def check_quant_storage(fn: str, quant_storage: Any) -> torch.dtype:
    """``quant_storage`` as a torch dtype: uint8 or a float dtype (or its name, as in a JSON config)."""
    value = quant_storage
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), value)
    if value not in QUANT_STORAGES:
        names = ", ".join(str(d).removeprefix("torch.") for d in QUANT_STORAGES)
        raise TypeError(f"[{fn}] quant_storage must be one of {names}, got {quant_storage!r}")
    return value


class Params4bit(nn.Parameter):
    """The packed 4-bit bytes of a :class:`Linear4bit` stored as a float dtype (``quant_storage``).

    Named as bitsandbytes' class on purpose: PEFT's ``prepare_model_for_kbit_training`` casts every
    float16/bfloat16 parameter to float32 except those of this name, and a numeric cast would
    destroy the bytes. Operations on it give plain tensors (as on any ``nn.Parameter``)."""


def _store_packed(packed: torch.Tensor, quant_storage: torch.dtype) -> nn.Parameter:
    """The frozen ``weight`` parameter holding ``packed`` (uint8 ``[bytes, 1]``) in ``quant_storage``."""
    if quant_storage == torch.uint8:
        return nn.Parameter(packed, requires_grad=False)
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    flat = packed.reshape(-1)
    pad = -flat.numel() % itemsize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return Params4bit(flat.contiguous().view(quant_storage).reshape(-1, 1), requires_grad=False)


def _as_bytes(weight: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The first ``nbytes`` bytes of a packed weight stored as any dtype, as uint8 ``[nbytes, 1]``
    (a view where the weight is contiguous: no copy)."""
    if weight.dtype == torch.uint8:
        return weight
    return weight.detach().contiguous().view(torch.uint8).reshape(-1)[:nbytes].reshape(-1, 1)


def check_settings(fn: str, quant_type: Any, blocksize: Any, compute_dtype: Any) -> None:
    check_bnb4_format(fn, quant_type, blocksize)
    if compute_dtype is not None and compute_dtype not in _DTYPE_NAMES:
        raise TypeError(
            f"[{fn}] compute_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, "
            f"got {compute_dtype!r}"
        )


class Linear4bit(nn.Module):
    """``y = x W^T + b`` with a frozen 4-bit ``W`` (NF4 or FP4, blockwise absmax,
    optional double quantization), computed by ``torch.ops.halo.matmul_4bit``.

    ``compute_dtype`` (default: the input's dtype) is the dtype the matmul runs in;
    the output comes back in the input's dtype, as bitsandbytes does.

    ``layer.activations = "int8"`` (default ``"exact"``) runs inference on CPU with x quantized
    per 8 elements to int8 (see :func:`halo.matmul_4bit`); a call whose input needs a
    gradient, or on CUDA, computes the exact product.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype | None = None,
        double_quant: bool = True,
        blocksize: int = 64,
        device: Any = None,
        dtype: torch.dtype | None = None,
        quant_storage: Any = torch.uint8,
    ) -> None:
        super().__init__()
        fn = "Linear4bit"
        check_settings(fn, quant_type, blocksize, compute_dtype)
        self.quant_storage = check_quant_storage(fn, quant_storage)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"[{fn}] {name} must be a positive integer, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.quant_type = quant_type
        self.compute_dtype = compute_dtype
        self.double_quant = bool(double_quant)
        self.blocksize = int(blocksize)
        self.nested_offset = 0.0
        self.original_dtype = dtype or torch.float32
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype or torch.float32),
            requires_grad=False,
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        # Plain attributes, not buffers: transformers' loader re-creates every non-persistent
        # buffer empty after loading; _apply below moves them with the layer.
        self.weight_absmax: torch.Tensor | None = None
        self.weight_nested_absmax: torch.Tensor | None = None
        self._quantized = False
        # "int8": inference with x quantized per 8 elements (halo.matmul_4bit); calls whose x
        # needs a gradient keep the exact product (the int8 path has no backward).
        self.activations = "exact"

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype | None = None,
        double_quant: bool = True,
        blocksize: int = 64,
        quant_storage: Any = torch.uint8,
    ) -> Linear4bit:
        """A quantized copy of an ``nn.Linear`` (same device; the float weight is not kept)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"[Linear4bit.from_linear] expected an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            quant_type,
            compute_dtype,
            double_quant,
            blocksize,
            device="meta",
            dtype=linear.weight.dtype,
            quant_storage=quant_storage,
        )
        layer.quantize_(linear.weight.detach())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    @classmethod
    def from_quantized(
        cls,
        qt: QuantizedTensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        """A layer around a 2-D :class:`halo.QuantizedTensor` (its buffers are copied into tensors)."""
        if not isinstance(qt, QuantizedTensor) or len(qt.shape) != 2:
            raise TypeError("[Linear4bit.from_quantized] expected a 2-D QuantizedTensor")
        out_features, in_features = qt.shape
        layer = cls(
            in_features,
            out_features,
            bias is not None,
            qt.quant_type,
            compute_dtype,
            qt.double_quant,
            qt.blocksize,
            device="meta",
        )
        layer._set_state(
            torch.from_numpy(np.ascontiguousarray(qt.packed).reshape(-1, 1).copy()),
            torch.from_numpy(np.ascontiguousarray(qt.absmax).copy()),
            None if not qt.double_quant else torch.from_numpy(np.ascontiguousarray(qt.nested_absmax).copy()),
            float(qt.nested_offset or 0.0),
            getattr(torch, qt.dtype),
        )
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor | None = None) -> Linear4bit:
        """Packs ``weight`` (default: the float weight the layer holds) in place, on its device."""
        fn = "Linear4bit.quantize_"
        w = self.weight if weight is None else weight
        if self._quantized and weight is None:
            return self
        if not w.is_floating_point():
            raise TypeError(f"[{fn}] the weight to quantize must be a float tensor, got {w.dtype}")
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"[{fn}] weight has shape {tuple(w.shape)}, expected {(self.out_features, self.in_features)}"
            )
        if w.device.type == "meta":
            raise ValueError(f"[{fn}] the weight is on the meta device; load real values first")
        if w.dtype not in _DTYPE_NAMES:
            w = w.float()
        packed, absmax = _ops.quantize_4bit(w.detach(), self.quant_type, self.blocksize)
        nested = None
        offset = 0.0
        if self.double_quant:
            absmax, nested, offset = _double_quantize(absmax)
        self._set_state(packed, absmax, nested, offset, w.dtype)
        return self

    def quantize_on_meta(self) -> Linear4bit:
        """The state :meth:`quantize_` gives, on the meta device: the shapes and dtypes of the packed
        weight (in ``quant_storage``) and its quantization statistics, no values. For a rank that
        builds the model without reading its checkpoint and receives the values by broadcast
        (:func:`halo.hf.load_on_rank0`)."""
        w = torch.empty(self.out_features, self.in_features, dtype=self.original_dtype, device="meta")
        packed, absmax = _ops.quantize_4bit(w, self.quant_type, self.blocksize)
        nested = None
        if self.double_quant:
            absmax, nested, _ = torch.ops.halo.double_quantize_absmax(absmax, 1)
        self._set_state(packed, absmax, nested, 0.0, w.dtype)
        return self

    def _set_state(self, packed, absmax, nested, offset, original_dtype) -> None:
        self.weight = _store_packed(packed, self.quant_storage)
        self.weight_absmax = absmax
        self.weight_nested_absmax = nested
        self.weight._is_hf_initialized = True  # tells transformers' loader not to re-initialize it
        self.double_quant = nested is not None
        self.nested_offset = float(offset)
        self.original_dtype = original_dtype
        self._quantized = True

    def _weight_holder(self) -> nn.Module:
        """The module whose parameters hold ``weight`` (a subclass may keep it in a child)."""
        return self

    def _apply(self, fn, recurse=True):
        # Device moves (.to, .cuda, .cpu) apply to the quantization statistics too; dtype casts
        # (.half(), .to(torch.bfloat16)) must not touch them (they are float32 / uint8 by format),
        # nor the packed bytes when quant_storage stores them as a float dtype.
        holder = self._weight_holder()
        weight = holder._parameters.get("weight")
        keep = self._quantized and weight is not None and weight.dtype != torch.uint8
        if keep:
            del holder._parameters["weight"]
        try:
            super()._apply(fn, recurse)
        finally:
            if keep:
                holder._parameters["weight"] = weight
        if keep:
            moved = fn(weight.detach())
            if moved.device != weight.device:
                with torch.no_grad():
                    weight.data = weight.data.to(moved.device)
        for name in ("weight_absmax", "weight_nested_absmax"):
            tensor = getattr(self, name)
            if tensor is not None:
                moved = fn(tensor)
                setattr(self, name, moved if moved.dtype == tensor.dtype else tensor.to(moved.device))
        return self

    @property
    def is_quantized(self) -> bool:
        return self._quantized

    @property
    def packed(self) -> torch.Tensor:
        """The packed 4-bit weight as uint8 ``[(n + 1) // 2, 1]`` whatever ``quant_storage`` is
        (a view of ``weight``, which under FSDP is the gathered one during forward/backward)."""
        return _as_bytes(self.weight, (self.out_features * self.in_features + 1) // 2)

    @property
    def quantized(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor over the layer's CPU buffers (no copy)."""
        self._require_quantized("Linear4bit.quantized")
        if self.weight.device.type != "cpu":
            raise ValueError(
                f"[Linear4bit.quantized] the weight is on {self.weight.device}; move the layer to the CPU"
            )
        return QuantizedTensor(
            self.packed.detach().numpy(),
            self.weight_absmax.numpy(),
            (self.out_features, self.in_features),
            _DTYPE_NAMES.get(self.original_dtype, "float32"),
            self.blocksize,
            self.quant_type,
            double_quant=self.double_quant,
            nested_absmax=None if self.weight_nested_absmax is None else self.weight_nested_absmax.numpy(),
            nested_offset=self.nested_offset if self.double_quant else None,
            kind="torch",
        )

    def weight_args(self) -> tuple:
        """(packed, absmax, nested_absmax, nested_offset, quant_type, blocksize) for torch.ops.halo.*."""
        return (
            self.packed,
            self.weight_absmax,
            self.weight_nested_absmax,
            float(self.nested_offset),
            self.quant_type,
            self.blocksize,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out, in] the 4-bit codes hold (default: the original dtype)."""
        self._require_quantized("Linear4bit.dequantize")
        return torch.ops.halo.dequantize_4bit(
            self.packed,
            self.weight_absmax,
            self.weight_nested_absmax,
            float(self.nested_offset),
            [self.out_features, self.in_features],
            self.quant_type,
            self.blocksize,
            dtype or self.original_dtype,
        )

    def _require_quantized(self, fn: str) -> None:
        if not self._quantized:
            raise RuntimeError(
                f"[{fn}] the layer is not quantized yet: load a state dict or call quantize_()"
            )

    # -- forward ---------------------------------------------------------------------------------------
    def compute_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.compute_dtype is None or x.dtype == self.compute_dtype else x.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._require_quantized("Linear4bit.forward")
        if not x.is_floating_point():
            raise TypeError(f"[Linear4bit.forward] x must be a float tensor, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"[Linear4bit.forward] x has shape {tuple(x.shape)}, expected [..., {self.in_features}]"
            )
        xc = self.compute_input(x)
        bias = None if self.bias is None else self.bias.to(xc.dtype)
        activations = getattr(self, "activations", "exact")
        if activations not in ("exact", "int8"):
            raise ValueError(
                f"[Linear4bit.forward] activations must be 'exact' or 'int8', got {activations!r}"
            )
        if activations == "int8" and (
            xc.device.type != "cpu" or (torch.is_grad_enabled() and xc.requires_grad)
        ):
            activations = "exact"
        y = torch.ops.halo.matmul_4bit(
            xc,
            self.packed,
            self.weight_absmax,
            self.weight_nested_absmax,
            float(self.nested_offset),
            self.out_features,
            self.quant_type,
            self.blocksize,
            bias,
            activations,
        )
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
            + ("" if self.quant_storage == torch.uint8 else f", quant_storage={self.quant_storage}")
        )

    # -- bitsandbytes state dict -------------------------------------------------------------------------
    def _quant_state_json(self) -> dict:
        state: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES.get(self.original_dtype, "float32"),
            "shape": [self.out_features, self.in_features],
        }
        if self.double_quant:
            state["nested_blocksize"] = 256
            state["nested_dtype"] = "float32"
            state["nested_offset"] = float(np.float32(self.nested_offset))
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed) and bias
        if not self._quantized:
            return
        device = self.weight.device
        destination[prefix + "weight.absmax"] = self.weight_absmax
        destination[prefix + "weight.quant_map"] = torch.from_numpy(
            _core.quant.code_book(self.quant_type)
        ).to(device)
        if self.double_quant:
            destination[prefix + "weight.nested_absmax"] = self.weight_nested_absmax
            destination[prefix + "weight.nested_quant_map"] = torch.from_numpy(_core.quant.dynamic_map()).to(
                device
            )
        blob = json.dumps(self._quant_state_json()).encode("utf-8")
        destination[prefix + f"weight.quant_state.bitsandbytes__{self.quant_type}"] = torch.frombuffer(
            bytearray(blob), dtype=torch.uint8
        ).to(device)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state_keys = [k for k in state_dict if k.startswith(prefix + "weight.quant_state.bitsandbytes__")]
        weight_key = prefix + "weight"
        if not state_keys:
            # A float checkpoint (nn.Linear's keys): load it and quantize.
            if weight_key in state_dict and not state_dict[weight_key].is_floating_point():
                error_msgs.append(
                    f"[Linear4bit] {weight_key}: a {state_dict[weight_key].dtype} weight without "
                    "bitsandbytes' quant_state entries; expected a float weight or a uint8 packed one "
                    f"with {weight_key}.quant_state.bitsandbytes__<nf4|fp4>"
                )
                return
            if weight_key in state_dict and state_dict[weight_key].is_floating_point():
                w = state_dict[weight_key]
                if tuple(w.shape) != (self.out_features, self.in_features):
                    error_msgs.append(
                        f"size mismatch for {weight_key}: {tuple(w.shape)} vs "
                        f"{(self.out_features, self.in_features)}"
                    )
                    return
                device = self.weight.device if self.weight.device.type != "meta" else w.device
                self._load_bias(state_dict, prefix, missing_keys, error_msgs)
                self.quantize_(w.to(device))
                return
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
        if _is_dtensor(sub["weight"]):
            self._load_shard(sub, prefix, error_msgs)
            if self.bias is not None:
                if prefix + "bias" not in state_dict:
                    missing_keys.append(prefix + "bias")
                else:
                    with torch.no_grad():
                        self.bias.copy_(state_dict[prefix + "bias"])  # in place: FSDP2 keeps its parameter
            return
        try:
            packed, absmax, nested, offset, dtype = read_bnb_state(sub, (self.out_features, self.in_features))
        except ValueError as error:
            error_msgs.append(f"[Linear4bit] {prefix}weight: {error}")
            return
        settings = json.loads(
            bytes(sub[state_keys[0][len(prefix) :]].cpu().numpy().tobytes()).decode("utf-8")
        )
        self.quant_type = settings["quant_type"]
        self.blocksize = int(settings["blocksize"])
        device = self.weight.device if self.weight.device.type != "meta" else packed.device
        self._set_state(
            packed.to(device), absmax.to(device), None if nested is None else nested.to(device), offset, dtype
        )
        self._load_bias(state_dict, prefix, missing_keys, error_msgs)
        if strict:
            known = {
                weight_key,
                prefix + "bias",
                *state_keys,
                *(prefix + "weight." + s for s in _STATE_SUFFIXES),
            }
            unexpected_keys.extend(  # a child's keys (a LoRA adapter's) are the child's to load
                k
                for k in state_dict
                if k.startswith(prefix)
                and k not in known
                and k[len(prefix) :].split(".", 1)[0] not in self._modules
            )

    @torch.no_grad()
    def _load_shard(self, sub: dict, prefix: str, error_msgs: list) -> None:
        """A sharded state dict (FSDP2, torch.distributed.checkpoint) into a layer sharded the same
        way: each rank copies its part of the packed weight in place; the quantization statistics
        (whole on every rank) are copied too. The settings must be the layer's."""
        settings_key = f"weight.quant_state.bitsandbytes__{self.quant_type}"
        same = (
            self._quantized
            and _is_dtensor(self.weight)
            and settings_key in sub
            and json.loads(bytes(sub[settings_key].cpu().numpy().tobytes()).decode("utf-8"))
            == self._quant_state_json()
            and sub["weight"].dtype == self.weight.dtype
            and tuple(sub["weight"].shape) == tuple(self.weight.shape)
            and sub["weight"].placements == self.weight.placements
        )
        if not same:
            error_msgs.append(
                f"[Linear4bit] {prefix}weight: a sharded 4-bit weight loads only into a layer quantized and "
                "sharded the same way (settings, quant_storage, shape, placements)"
            )
            return
        self.weight.copy_(sub["weight"])
        self.weight_absmax.copy_(sub["weight.absmax"])
        if self.weight_nested_absmax is not None:
            self.weight_nested_absmax.copy_(sub["weight.nested_absmax"])

    def _load_bias(self, state_dict, prefix, missing_keys, error_msgs) -> None:
        if self.bias is None:
            return
        key = prefix + "bias"
        if key not in state_dict:
            missing_keys.append(key)
            return
        value = state_dict[key]
        if tuple(value.shape) != (self.out_features,):
            error_msgs.append(f"size mismatch for {key}: {tuple(value.shape)} vs {(self.out_features,)}")
            return
        device = self.bias.device if self.bias.device.type != "meta" else value.device
        self.bias = nn.Parameter(
            value.detach().to(device=device, dtype=value.dtype).clone(), requires_grad=self.bias.requires_grad
        )


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """bitsandbytes' nested absmax (torch.ops.halo.double_quantize_absmax), its offset as a float."""
    codes, nested, offset = torch.ops.halo.double_quantize_absmax(
        absmax.detach(), int(torch.get_num_threads())
    )
    return codes, nested, float(offset)


def read_bnb_state(sub: dict, shape: tuple[int, int]):
    """(packed, absmax, nested_absmax or None, offset, original dtype) from bitsandbytes'
    entries for ``weight`` (keys relative to the layer), checked like QuantizedTensor does."""
    packed_dtype = sub["weight"].dtype
    if packed_dtype not in QUANT_STORAGES:
        raise ValueError(
            f"the packed 4-bit weight must be torch.uint8 or a float quant_storage dtype, got {packed_dtype}"
        )
    cpu = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in sub.items()}
    if packed_dtype != torch.uint8:  # bitsandbytes' quant_storage: the bytes viewed as a float dtype
        nbytes = (shape[0] * shape[1] + 1) // 2
        itemsize = cpu["weight"].element_size()
        expected = -(-nbytes // itemsize)
        if cpu["weight"].numel() != expected:  # e.g. the uint8 bytes cast numerically to a float
            raise ValueError(
                f"a packed 4-bit weight stored as {packed_dtype} must hold {expected} values for a "
                f"{list(shape)} weight ({nbytes} bytes), got {cpu['weight'].numel()}"
            )
        cpu["weight"] = cpu["weight"].contiguous().view(torch.uint8).reshape(-1)[:nbytes].reshape(-1, 1)
    qt = QuantizedTensor.from_bnb_state_dict(cpu, prefix="weight")
    if tuple(qt.shape) != tuple(shape):
        raise ValueError(f"the checkpoint holds shape {list(qt.shape)}, the layer is {list(shape)}")
    device = sub["weight"].device
    packed = torch.from_numpy(np.ascontiguousarray(qt.packed).reshape(-1, 1).copy()).to(device)
    absmax = torch.from_numpy(np.ascontiguousarray(qt.absmax).copy()).to(device)
    nested = None
    if qt.double_quant:
        nested = torch.from_numpy(np.ascontiguousarray(qt.nested_absmax).copy()).to(device)
    return packed, absmax, nested, float(qt.nested_offset or 0.0), getattr(torch, qt.dtype)
