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

from .nn import Linear4bit

try:
    from peft.tuners.lora import LoraConfig, LoraLayer
except ImportError as error:  # pragma: no cover - peft is a dev dependency
    raise ImportError("halo's PEFT integration needs the peft package") from error

__all__ = ["LoraLinear4bit", "register_lora"]


class LoraLinear4bit(nn.Module, LoraLayer):
    """LoRA adapters around a :class:`halo.nn.Linear4bit` with a fused forward."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

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
        if config.use_dora or getattr(config, "alora_invocation_tokens", None) is not None:
            raise ValueError("[LoraLinear4bit] DoRA and aLoRA are not supported on halo's 4-bit layers")
        if getattr(config, "lora_bias", False):
            raise ValueError("[LoraLinear4bit] lora_bias=True is not supported on halo's 4-bit layers")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any):
        return None

    # -- forward ---------------------------------------------------------------------------------------
    def _fused_adapter(self) -> str | None:
        active = [a for a in self.active_adapters if a in self.lora_A]
        return active[0] if len(active) == 1 and active[0] not in self.lora_variant else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        base: Linear4bit = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
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
        y = torch.ops.halo.lora_linear(
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
        return y

    def _unfused_forward(self, x, adapter_names, *args, **kwargs):
        """Several active adapters or per-sample adapter names: base + each adapter, as PEFT."""
        result = self.get_base_layer()(x, *args, **kwargs)
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
            base: Linear4bit = self.get_base_layer()
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
        base: Linear4bit = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                restored = base.dequantize(torch.float32) - self.get_delta_weight(adapter).float()
                base.quantize_(restored.to(base.original_dtype))

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_lora(config: LoraConfig) -> LoraConfig:
    """Maps :class:`halo.nn.Linear4bit` to :class:`LoraLinear4bit` in ``config`` (PEFT's
    ``_register_custom_module``); returns the config. Not saved in ``adapter_config.json``.

    PEFT (0.22) picks the LoRA layer for a layer type it does not know only from this mapping
    on the LoraConfig; nothing it reads from the model can choose it. So a config passed to
    ``get_peft_model`` -- or, for ``PeftModel.from_pretrained(base, path, config=...)``, the
    one read with ``LoraConfig.from_pretrained(path)`` -- goes through this call first.
    Calling it twice is harmless."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"[register_lora] expected a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({Linear4bit: LoraLinear4bit})
    return config
