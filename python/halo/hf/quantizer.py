"""4-bit loading for Hugging Face transformers without bitsandbytes (re-exported by ``halo.hf``).

- :class:`HaloConfig` is registered with transformers' public quantizer registry
  (``register_quantization_config`` / ``register_quantizer``, method ``"halo_4bit"``), so
  ``AutoModelForCausalLM.from_pretrained(path, quantization_config=halo.hf.HaloConfig())``
  replaces every ``nn.Linear`` (but ``skip_modules``) by :class:`halo.nn.Linear4bit` on the
  meta device and quantizes each weight as it is read: the float model never exists whole.
- :func:`quantize_model` does the same to a model already in memory, layer by layer.
- :func:`load_bnb_checkpoint` loads a folder saved by transformers with a bitsandbytes
  4-bit ``quantization_config`` (same keys and bytes) with halo's layers.
- A model saved after loading with ``HaloConfig`` writes bitsandbytes' tensor layout and a
  ``quantization_config`` with ``quant_method: "halo_4bit"``; it loads back the same way.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._pages import release_file_pages
from ..nn import Linear4bit, check_quant_storage, check_settings
from ..ops import FLOAT_NAMES

__all__ = ["HaloConfig", "auto_compute_dtype", "load_bnb_checkpoint", "quantize_model"]

QUANT_METHOD = "halo_4bit"
_DTYPES = {name: dtype for dtype, name in FLOAT_NAMES.items()}


def auto_compute_dtype(
    cpu_features: Sequence[str] | None = None, cuda: bool | None = None
) -> tuple[torch.dtype, str]:
    """(dtype, why) that ``compute_dtype="auto"`` picks: bfloat16 on a CUDA GPU that computes it
    or on a CPU whose halo kernels compute it natively (AMX or AVX512-BF16), float32 elsewhere
    (an AVX2-only CPU emulates bfloat16 in float32 with a conversion at every step, many times
    slower). ``cpu_features`` (default :func:`halo.backend.native_bf16_features`) and ``cuda``
    (default: a CUDA device with bfloat16 is present) are the machine's answers, given here to
    ask about another machine."""
    if cuda is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if cuda:
        return torch.bfloat16, "a CUDA GPU with bfloat16"
    if cpu_features is None:
        from ..backend import native_bf16_features

        cpu_features = native_bf16_features()
    native = sorted(set(cpu_features) & {"amx_bf16", "avx512_bf16"})
    if native:
        return torch.bfloat16, f"this CPU computes bfloat16 natively ({', '.join(native)})"
    return (
        torch.float32,
        "this CPU has no native bfloat16 (no AMX or AVX512-BF16), where bfloat16 is emulated",
    )


_NOTICED: set = set()


def _notice_auto(dtype: torch.dtype, why: str) -> None:
    """One line on stderr, once per process and choice, saying what "auto" chose and why."""
    line = (
        f"halo: compute_dtype='auto' -> {str(dtype).removeprefix('torch.')}: {why}; "
        "pass an explicit dtype to override"
    )
    if line not in _NOTICED:
        _NOTICED.add(line)
        print(line, file=sys.stderr)


def resolve_compute_dtype(value: Any) -> torch.dtype | None:
    """``value`` as a torch dtype; ``"auto"`` becomes :func:`auto_compute_dtype`'s choice (with
    its one-line notice). An explicit dtype (or its name) is returned as it is."""
    if isinstance(value, str) and value == "auto":
        dtype, why = auto_compute_dtype()
        _notice_auto(dtype, why)
        return dtype
    return _dtype_of(value)


def _dtype_of(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise TypeError(
        f"[HaloConfig] compute_dtype must be a torch float dtype, its name or 'auto', got {value!r}"
    )


def _should_convert(name: str, skip: Sequence[str]) -> bool:
    from transformers.quantizers.quantizers_utils import should_convert_module

    return should_convert_module(name, list(skip))


def _lora_ready(model: nn.Module) -> nn.Module:
    """Where PEFT is installed, every Linear4bit becomes a :class:`halo.hf.peft_layers.PeftLinear4bit`
    in place (a PEFT LoRA layer with no adapter yet; same names and state-dict keys), so that a
    plain ``peft.LoraConfig`` gives halo's fused layer, as it gives bitsandbytes' on its model."""
    if importlib.util.find_spec("peft") is None:
        return model
    from .peft_layers import add_lora_layers

    return add_lora_layers(model)


def _replace_linears(
    model: nn.Module, config: HaloConfig, skip: Sequence[str], on_meta: bool, pre_quantized: bool = False
) -> int:
    """Swaps every plain nn.Linear not matched by ``skip`` for a Linear4bit; returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not _should_convert(name, skip):
            continue
        if on_meta:
            layer = Linear4bit(
                module.in_features,
                module.out_features,
                module.bias is not None,
                config.quant_type,
                config.compute_dtype,
                config.double_quant,
                config.blocksize,
                device="meta",
                dtype=module.weight.dtype,
                quant_storage=config.quant_storage,
            )
            if pre_quantized:
                layer.weight = nn.Parameter(layer.weight.data.to(config.quant_storage), requires_grad=False)
        else:
            layer = Linear4bit.from_linear(
                module,
                config.quant_type,
                config.compute_dtype,
                config.double_quant,
                config.blocksize,
                config.quant_storage,
            )
        layer.requires_grad_(False)
        model.set_submodule(name, layer)
        replaced += 1
    return replaced


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = torch.bfloat16,
    skip_modules: Sequence[str] = ("lm_head",),
    quant_storage: Any = torch.uint8,
) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` (but those matched by ``skip_modules``, as
    transformers matches them) by a :class:`halo.nn.Linear4bit` holding the same weight in
    4 bits, one layer at a time (each float weight is freed once packed). ``quant_storage``:
    the dtype the packed bytes are stored as (a float dtype for FSDP1). Returns ``model``."""
    fn = "quantize_model"
    if not isinstance(model, nn.Module):
        raise TypeError(f"[{fn}] model must be a torch.nn.Module, got {type(model).__name__}")
    config = HaloConfig(quant_type, double_quant, blocksize, compute_dtype, skip_modules, quant_storage)
    if _replace_linears(model, config, config.skip_modules, on_meta=False) == 0:
        raise ValueError(
            f"[{fn}] the model has no nn.Linear layers outside skip_modules={list(skip_modules)}"
        )
    _lora_ready(model)
    if hasattr(model, "config"):
        model.config.quantization_config = config
        model.is_quantized = True
        model.is_loaded_in_4bit = True
        model.quantization_method = QUANT_METHOD
    return model


def _transformers():
    try:
        import transformers  # noqa: F401
        from transformers.core_model_loading import ConversionOps
        from transformers.quantizers import HfQuantizer
        from transformers.quantizers.auto import register_quantization_config, register_quantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError as error:  # pragma: no cover - transformers is a dev dependency
        raise ImportError("halo.hf's 4-bit loading needs the transformers package") from error
    return (
        HfQuantizer,
        QuantizationConfigMixin,
        ConversionOps,
        register_quantization_config,
        register_quantizer,
    )


_HfQuantizer, _QuantizationConfigMixin, _ConversionOps, _register_config, _register_quantizer = (
    _transformers()
)


@_register_config(QUANT_METHOD)
@dataclass(init=False, repr=False)
class HaloConfig(_QuantizationConfigMixin):
    """Quantization config for ``from_pretrained``: NF4/FP4 blockwise 4-bit weights (bitsandbytes'
    layout), optional double quantization, the dtype the matmuls run in (``"auto"``: bfloat16
    where the machine computes it natively, float32 elsewhere; see :func:`auto_compute_dtype`),
    the modules left in float (``lm_head`` by default; matched as transformers matches
    ``llm_int8_skip_modules``), and ``quant_storage``: the dtype the packed bytes are stored as,
    uint8 or (as bitsandbytes' ``bnb_4bit_quant_storage``) the float dtype of the other
    parameters, so that FSDP1 / accelerate's FSDP plugin can flatten them together."""

    def __init__(
        self,
        quant_type: str = "nf4",
        double_quant: bool = True,
        blocksize: int = 64,
        compute_dtype: Any = torch.bfloat16,
        skip_modules: Sequence[str] | None = ("lm_head",),
        quant_storage: Any = torch.uint8,
        **kwargs: Any,
    ) -> None:
        fn = "HaloConfig"
        auto = isinstance(compute_dtype, str) and compute_dtype == "auto"
        compute_dtype = resolve_compute_dtype(compute_dtype)
        quant_storage = check_quant_storage(fn, quant_storage)
        check_settings(fn, quant_type, blocksize, compute_dtype)
        if skip_modules is not None and (
            isinstance(skip_modules, str) or not all(isinstance(s, str) for s in skip_modules)
        ):
            raise TypeError(f"[{fn}] skip_modules must be a sequence of module names, got {skip_modules!r}")
        unknown = set(kwargs) - {"quant_method"}
        if unknown:
            raise TypeError(f"[{fn}] unknown settings: {sorted(unknown)}")
        self.quant_method = QUANT_METHOD
        self.quant_type = quant_type
        self.double_quant = bool(double_quant)
        self.blocksize = int(blocksize)
        self.compute_dtype = compute_dtype
        # what "auto" chose here: a saved config keeps "auto" (another machine chooses again)
        # unless compute_dtype was set to something else since
        self._auto_choice = compute_dtype if auto else None
        self.skip_modules = tuple(skip_modules or ())
        self.quant_storage = quant_storage

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "blocksize": self.blocksize,
            "compute_dtype": "auto"
            if self._auto_choice is not None and self.compute_dtype == self._auto_choice
            else None
            if self.compute_dtype is None
            else str(self.compute_dtype).removeprefix("torch."),
            "skip_modules": list(self.skip_modules),
            "quant_storage": str(self.quant_storage).removeprefix("torch."),
        }

    def __repr__(self) -> str:
        return f"HaloConfig({self.to_dict()})"

    @classmethod
    def from_bnb(cls, bnb: Any) -> HaloConfig:
        """The HaloConfig equal to a 4-bit ``BitsAndBytesConfig`` (object or dict)."""
        get = bnb.get if isinstance(bnb, dict) else (lambda key, default=None: getattr(bnb, key, default))
        if not get("load_in_4bit", False):
            raise ValueError(
                "[HaloConfig.from_bnb] only 4-bit bitsandbytes configs (load_in_4bit=True) map to halo"
            )
        storage = get("bnb_4bit_quant_storage", None) or torch.uint8
        storage = check_quant_storage("HaloConfig.from_bnb", storage)
        skip = get("llm_int8_skip_modules", None)
        return cls(
            quant_type=get("bnb_4bit_quant_type", "fp4"),
            double_quant=bool(get("bnb_4bit_use_double_quant", False)),
            blocksize=64,
            compute_dtype=get("bnb_4bit_compute_dtype", torch.float32) or torch.float32,
            skip_modules=None if skip is None else tuple(skip),
            quant_storage=storage,
        )


class _HaloQuantize(_ConversionOps):
    """Weight-conversion op for transformers' loader: packs one float weight into the
    Linear4bit that owns it, right after it is read (the float copy is dropped at once, and the
    pages of the memory-mapped checkpoint it was read from leave this process's RSS)."""

    def __init__(self, quantizer: HaloHfQuantizer) -> None:
        self.hf_quantizer = quantizer

    def convert(self, input_dict: dict, full_layer_name: str | None = None, model: Any = None, **kwargs):
        from transformers.quantizers.quantizers_utils import get_module_from_name

        result = {}
        for param_name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, param_name)
            module.quantize_(value)
            release_file_pages(value)
            module._is_hf_initialized = True
            result[param_name] = module.weight
        return result


class _HaloDeserialize(_ConversionOps):
    """Loader op for a pre-quantized checkpoint: bitsandbytes' six tensors of one weight
    become the state of its Linear4bit."""

    def __init__(self, quantizer: HaloHfQuantizer) -> None:
        self.hf_quantizer = quantizer

    def convert(self, input_dict: dict, full_layer_name: str | None = None, model: Any = None, **kwargs):
        from transformers.quantizers.quantizers_utils import get_module_from_name

        from ..nn import read_bnb_state

        if len(input_dict) == 1:
            return input_dict
        entries = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
        sub = {}
        for key, value in entries.items():
            suffix = key.rsplit("weight", 1)[-1] if key != "weight" else ""
            sub["weight" + suffix] = value
        packed, absmax, nested, offset, dtype = read_bnb_state(sub, (module.out_features, module.in_features))
        _, quant_type = next(k for k in sub if "quant_state.bitsandbytes__" in k).rsplit("__", 1)
        module.quant_type = quant_type
        module._set_state(packed, absmax, nested, offset, dtype)
        module._is_hf_initialized = True
        return {"weight": module.weight}


@_register_quantizer(QUANT_METHOD)
class HaloHfQuantizer(_HfQuantizer):
    """transformers' side of HaloConfig: which modules become Linear4bit, and the ops that
    quantize (or deserialize) each weight while the checkpoint is read."""

    requires_calibration = False

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def update_device_map(self, device_map):
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        from transformers.quantizers.quantizers_utils import get_module_from_name

        module, name = get_module_from_name(model, param_name)
        return isinstance(module, Linear4bit) and name == "weight"

    def _process_model_before_weight_loading(self, model, device_map=None, **kwargs):
        config = self.quantization_config
        # As transformers does for bitsandbytes: tied and output embeddings always stay in float.
        skip = self.get_modules_to_not_convert(
            model, list(config.skip_modules), model._keep_in_fp32_modules, add_default_skips=True
        )
        self.modules_to_not_convert = skip
        _replace_linears(model, config, skip, on_meta=True, pre_quantized=self.pre_quantized)

    def _process_model_after_weight_loading(self, model, **kwargs):
        missing = [
            name for name, m in model.named_modules() if isinstance(m, Linear4bit) and not m.is_quantized
        ]
        if missing:
            raise ValueError(f"[HaloConfig] these layers got no weight from the checkpoint: {missing[:5]}")
        model.is_loaded_in_4bit = True
        return _lora_ready(model)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def get_quantize_ops(self):
        return _HaloQuantize(self)

    serialized_names = {  # as transformers declares it
        "weight": [
            "weight",
            "weight.nested_absmax",
            "weight.nested_quant_map",
            "weight.quant_map",
            "weight.absmax",
            "weight.quant_state.bitsandbytes__nf4",
            "weight.quant_state.bitsandbytes__fp4",
        ]
    }

    def get_load_operations(self) -> dict:
        return {"deserialize": _HaloDeserialize}


def load_bnb_checkpoint(path: Any, model_class: Any = None, compute_dtype: Any = None, **kwargs: Any):
    """Loads a folder saved by transformers with a bitsandbytes 4-bit ``quantization_config``
    using halo's Linear4bit (bitsandbytes need not be installed). ``kwargs`` go to
    ``from_pretrained``; ``compute_dtype`` overrides the saved ``bnb_4bit_compute_dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fn = "load_bnb_checkpoint"
    model_class = model_class or AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    saved = getattr(config, "quantization_config", None)
    if saved is None:
        raise ValueError(f"[{fn}] {path} has no quantization_config in config.json")
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    if saved.get("quant_method") != "bitsandbytes" or not saved.get("load_in_4bit"):
        raise ValueError(
            f"[{fn}] {path} is not a bitsandbytes 4-bit checkpoint (quantization_config {saved})"
        )
    halo_config = HaloConfig.from_bnb(saved)
    if compute_dtype is not None:
        halo_config.compute_dtype = _dtype_of(compute_dtype)
    config.quantization_config = halo_config.to_dict()
    return model_class.from_pretrained(path, config=config, **kwargs)
