"""PEFT's LoRA on halo's 4-bit layers, through PEFT's public custom-module mapping.

    config = LoraConfig(r=16, lora_alpha=32, target_modules=[...], task_type="CAUSAL_LM")
    halo.hf.register_lora(config)             # maps halo.nn.Linear4bit -> LoraLinear4bit
    model = peft.get_peft_model(model, config)

:class:`LoraLinear4bit` follows PEFT's LoRA layer conventions (``lora_A`` / ``lora_B``
``nn.Linear`` per adapter, ``scaling``, ``lora_dropout`` modules), so ``save_pretrained``
writes a standard adapter that loads on the float base with ``PeftModel.from_pretrained``.
Its forward runs the base 4-bit matmul and the adapter in one op
(``torch.ops.halo.lora_linear``); the dropout module runs first, on the same tensor as in
PEFT, so it draws the same mask from torch's RNG and a seeded run reproduces PEFT.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..nn import Linear4bit

try:
    from peft.tuners.lora import LoraConfig, LoraLayer
except ImportError as error:  # pragma: no cover - peft is a dev dependency
    raise ImportError("halo's PEFT integration needs the peft package") from error

__all__ = ["LoraLinear4bit", "PeftLinear4bit", "add_lora_layers", "register_lora"]


class _Lora4bit(LoraLayer):
    """The LoRA side of both layers: adapters over a halo 4-bit layer, a fused forward, merges.
    A subclass says where its 4-bit layer is (``_four_bit``) and how to run it alone
    (``_base_forward``)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

    def _four_bit(self) -> Linear4bit:
        raise NotImplementedError

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def _check_config(self, fn: str, config: LoraConfig) -> None:
        if config.use_dora or getattr(config, "alora_invocation_tokens", None) is not None:
            raise ValueError(f"[{fn}] DoRA and aLoRA are not supported on halo's 4-bit layers")
        if getattr(config, "lora_bias", False):
            raise ValueError(f"[{fn}] lora_bias=True is not supported on halo's 4-bit layers")

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any):
        return None

    # -- forward ---------------------------------------------------------------------------------------
    def _fused_adapter(self) -> str | None:
        active = [a for a in self.active_adapters if a in self.lora_A]
        return active[0] if len(active) == 1 and active[0] not in self.lora_variant else None

    def _lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        base = self._four_bit()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x, *args, **kwargs)
        if self.merged:
            return self._base_forward(x, *args, **kwargs)
        adapter = self._fused_adapter()
        if adapter is None or adapter_names is not None:
            return self._unfused_forward(x, adapter_names, *args, **kwargs)
        lora_A = self.lora_A[adapter].weight
        lora_B = self.lora_B[adapter].weight
        # As PEFT: the adapter input is x in the adapter's dtype (outside autocast), then dropout.
        x_lora = x if torch.is_autocast_enabled() else x.to(lora_A.dtype)
        x_lora = self.lora_dropout[adapter](x_lora)
        xc = base.compute_input(x)
        if x_lora.dtype != lora_A.dtype:
            x_lora = x_lora.to(lora_A.dtype)
        bias = None if base.bias is None else base.bias.to(xc.dtype)
        return torch.ops.halo.lora_linear(
            xc,
            x_lora,
            base.packed,
            base.weight_absmax,
            base.weight_nested_absmax,
            float(base.nested_offset),
            base.out_features,
            base.quant_type,
            base.blocksize,
            bias,
            lora_A,
            lora_B,
            float(self.scaling[adapter]),
            out_dtype=x.dtype,  # back in x's dtype from the op itself: no bf16 round trip
        )

    def _unfused_forward(self, x, adapter_names, *args, **kwargs):
        """Several active adapters or per-sample adapter names: base + each adapter, as PEFT."""
        result = self._base_forward(x, *args, **kwargs)
        names = set(adapter_names) if adapter_names is not None else set(self.active_adapters)
        for adapter in names:
            if adapter not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
            rows = slice(None)
            if adapter_names is not None:
                rows = [i for i, name in enumerate(adapter_names) if name == adapter]
            xs = x[rows] if torch.is_autocast_enabled() else x[rows].to(lora_A.weight.dtype)
            delta = lora_B(lora_A(self.lora_dropout[adapter](xs))) * self.scaling[adapter]
            if adapter_names is None:
                result = result + delta.to(result.dtype)
            else:
                result[rows] = result[rows] + delta.to(result.dtype)
        return result

    # -- merge -----------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantize, add ``scaling * B A``, re-quantize (loses precision, as PEFT's 4-bit merge)."""
        from peft.tuners.tuners_utils import check_adapters_to_merge

        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            warnings.warn(
                "Merging LoRA into a 4-bit layer re-quantizes it and rounds the result.", stacklevel=2
            )
            base = self._four_bit()
            merged = base.dequantize(torch.float32) + self.get_delta_weight(adapter).float()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"
                )
            base.quantize_(merged.to(base.original_dtype))
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self._four_bit()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                restored = base.dequantize(torch.float32) - self.get_delta_weight(adapter).float()
                base.quantize_(restored.to(base.original_dtype))


class LoraLinear4bit(nn.Module, _Lora4bit):
    """LoRA adapters around a :class:`halo.nn.Linear4bit` with a fused forward."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        with (
            warnings.catch_warnings()
        ):  # PEFT warns about any layer class it does not know; sizes are set below
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            LoraLayer.__init__(self, base_layer)
        base = self.get_base_layer()
        if not isinstance(base, Linear4bit):
            raise TypeError(
                f"[LoraLinear4bit] the base layer must be a halo.nn.Linear4bit, got {type(base).__name__}"
            )
        self._check_config("LoraLinear4bit", config)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _four_bit(self) -> Linear4bit:
        return self.get_base_layer()

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.get_base_layer()(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._lora_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class _BaseWeights(nn.Module):
    """Where a :class:`PeftLinear4bit` keeps its ``weight`` and ``bias``: PEFT counts everything
    on a LoRA layer as the adapter's except the child called ``base_layer``. Its parameters are
    the parent's to save and load (under the parent's plain keys)."""

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        pass  # the parent Linear4bit has read weight and bias already

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("[PeftLinear4bit] base_layer only holds the weight; call the layer itself")


_OWN = ("weight", "bias")
_BASE = "base_layer."


class PeftLinear4bit(Linear4bit, _Lora4bit):
    """The :class:`halo.nn.Linear4bit` of a model loaded with ``HaloConfig`` (or
    ``quantize_model``) where PEFT is installed: also a PEFT ``LoraLayer``, with no adapter until
    PEFT adds one (``update_layer``, which PEFT calls on a layer that already is a LoRA layer),
    so a plain ``LoraConfig`` gives halo's fused layer. Without an adapter it is the plain layer.
    ``weight`` and ``bias`` live in a ``base_layer`` child (what PEFT takes for the base), but
    the state-dict keys are the plain layer's: bitsandbytes' own."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN and "base_layer" in self.__dict__.get("_modules", {}):
            setattr(self._modules["base_layer"], name, value)
        else:
            super().__setattr__(name, value)

    @property
    def weight(self) -> torch.Tensor:
        return self._modules["base_layer"].weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self._modules["base_layer"].bias

    def _weight_holder(self) -> nn.Module:
        return self._modules["base_layer"]

    def get_base_layer(self) -> PeftLinear4bit:
        """The 4-bit layer: this one (``base_layer`` only holds its weight and bias)."""
        return self

    @classmethod
    def adopt(cls, layer: Linear4bit) -> PeftLinear4bit:
        """``layer`` itself, made a PeftLinear4bit (its tensors are not copied)."""
        if type(layer) is not Linear4bit:
            raise TypeError(
                f"[PeftLinear4bit.adopt] expected a halo.nn.Linear4bit, got {type(layer).__name__}"
            )
        holder = _BaseWeights()
        for name in _OWN:
            value = (
                layer._parameters.pop(name) if name in layer._parameters else layer.__dict__.pop(name, None)
            )
            setattr(holder, name, value)
        layer.__class__ = cls
        nn.Module.__setattr__(layer, "base_layer", holder)
        layer._clear_adapters()
        layer._register_state_dict_hook(_plain_keys)
        return layer

    def _clear_adapters(self) -> None:
        """PEFT's own fresh LoraLayer state (no adapter) around this layer's weights."""
        LoraLayer.__init__(self, self._modules["base_layer"])
        self._active_adapter = "default"
        self.fan_in_fan_out = False

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return self.in_features, self.out_features  # PEFT asks for them; it knows no halo layer

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any):
        self._check_config("PeftLinear4bit", config)
        return super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _four_bit(self) -> Linear4bit:
        return self

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return Linear4bit.forward(self, x)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.lora_A:
            return Linear4bit.forward(self, x)
        return self._lora_forward(x, *args, **kwargs)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> PeftLinear4bit:
        """PEFT's ``merge_and_unload`` / ``unload``: merges (re-quantizing) if asked, then drops
        every adapter; the layer stays, without adapters, and PEFT can extend it again."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self._clear_adapters()
        return self

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)


def _plain_keys(module, state_dict, prefix, local_metadata) -> None:
    """State-dict hook: ``weight`` / ``bias`` under the layer's own prefix, not ``base_layer.``."""
    for name in _OWN:
        key = prefix + _BASE + name
        if key in state_dict:
            state_dict[prefix + name] = state_dict.pop(key)


def add_lora_layers(model: nn.Module) -> nn.Module:
    """Makes every :class:`halo.nn.Linear4bit` of ``model`` a :class:`PeftLinear4bit` (in place:
    names, state-dict keys and tensors stay) and freezes the model; returns ``model``.

    A model holding LoRA layers is one PEFT has seen: ``get_peft_model`` keeps its parameters'
    trainability (so the base is frozen here, as PEFT would freeze it) and warns of a "second
    time" (silenced here: the layers hold no adapter)."""
    for module in list(model.modules()):
        if type(module) is Linear4bit:
            PeftLinear4bit.adopt(module)
    model.requires_grad_(False)
    warnings.filterwarnings("ignore", message="You are trying to modify a model with PEFT for a second time")
    return model


def register_lora(config: LoraConfig) -> LoraConfig:
    """Maps :class:`halo.nn.Linear4bit` to :class:`LoraLinear4bit` in ``config`` (PEFT's
    ``_register_custom_module``); returns the config. Not saved in ``adapter_config.json``.

    Needed only for ``Linear4bit`` layers built by hand: the layers of a model loaded with
    ``HaloConfig`` or ``quantize_model`` are :class:`PeftLinear4bit`, which PEFT extends without
    the mapping (on them this call changes nothing). Calling it twice is harmless."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"[register_lora] expected a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({Linear4bit: LoraLinear4bit})
    return config
