"""HALO quantization of a whole Hugging Face (torch) model.

``halo_quantize_model`` estimates a sensitivity for every ``nn.Linear`` from a
few calibration batches, quantizes each weight with :func:`halo.halo_quantize`
and writes the dequantized weights back (simulated quantization: the model
then computes with exactly the values the quantized format holds). It returns
a report per layer with the HaloQuantized objects.

Sensitivity sources:
- ``"activation"`` (default): mean square of each input feature over the
  calibration tokens, broadcast over output rows (the diagonal of the layer's
  input Gram matrix, so sum s*dw^2 approximates the output error).
- ``"fisher"``: squared gradients summed over batches of a loss: the model's own
  loss when the batch yields one (e.g. causal LM with labels), else ``loss_fn``.
- ``"magnitude"``: |w|, no calibration needed.
``compute_sensitivity`` returns them per layer, so several runs can share one calibration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .hardware import HardwareModel
from .quantizer import (
    BASELINES,
    Estimate,
    HaloQuantized,
    check_tile,
    halo_quantize,
    weighted_error,
)

SENSITIVITIES = ("activation", "fisher", "magnitude")


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    weighted_error: float  # sum s dw^2 / sum s w^2 under the layer's sensitivity
    average_bits: float
    speedup: float  # against the uniform baseline at the nominal point
    energy_saving: float
    switches: int
    sparse_fraction: float
    latency_ns: float
    baseline_latency_ns: float
    energy_nj: float
    baseline_energy_nj: float
    estimate: Estimate | None = None  # HALO and every baseline (uniform, w8a8, fp16)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "estimate"}
        out["shape"] = list(self.shape)
        if self.estimate is not None:
            out["estimate"] = self.estimate.as_dict()
        return out


@dataclass
class ModelReport:
    layers: list[LayerReport] = field(default_factory=list)
    quantized: dict[str, HaloQuantized] = field(default_factory=dict)

    def totals(self, tokens: int | None = None) -> dict:
        """Whole-model figures: latency/energy summed over layers (run one after another), bits weighted by
        size; speed-up and energy saving against each baseline. ``tokens`` re-prices every layer."""
        if not self.layers:
            return {}
        numel = np.array([r.shape[0] * r.shape[1] for r in self.layers], np.float64)
        estimates = [
            self.quantized[r.name].estimate(tokens) if r.name in self.quantized else r.estimate
            for r in self.layers
        ]
        out = {
            "layers": len(self.layers),
            "average_bits": float((numel * [r.average_bits for r in self.layers]).sum() / numel.sum()),
            "weighted_error": float(np.mean([r.weighted_error for r in self.layers])),
        }
        if any(e is None for e in estimates):
            latency = sum(r.latency_ns for r in self.layers)
            energy = sum(r.energy_nj for r in self.layers)
            out["speedup"] = sum(r.baseline_latency_ns for r in self.layers) / latency
            out["energy_saving"] = 1.0 - energy / sum(r.baseline_energy_nj for r in self.layers)
            return out
        latency = sum(e.halo.latency_ns for e in estimates)
        energy = sum(e.halo.energy_nj for e in estimates)
        out.update(latency_ns=latency, energy_nj=energy, tokens=estimates[0].tokens)
        out["speedup_vs"], out["energy_saving_vs"], out["baseline_bits"] = {}, {}, {}
        for name in BASELINES:
            base_latency = sum(e.baselines[name].latency_ns for e in estimates)
            base_energy = sum(e.baselines[name].energy_nj for e in estimates)
            out["speedup_vs"][name] = base_latency / latency
            out["energy_saving_vs"][name] = 1.0 - energy / base_energy
            out["baseline_bits"][name] = float(
                (numel * [e.baselines[name].bits for e in estimates]).sum() / numel.sum()
            )
        # The sparse engine (salient weights and outliers) runs beside the array: its own time and
        # energy, and its time as a share of the array's (the paper keeps it under 1 %).
        out["sparse_ns"] = sum(e.sparse_ns for e in estimates)
        out["sparse_nj"] = sum(e.sparse_nj for e in estimates)
        out["sparse_share"] = out["sparse_ns"] / latency if latency > 0 else 0.0
        out["speedup"] = out["speedup_vs"]["uniform"]
        out["energy_saving"] = out["energy_saving_vs"]["uniform"]
        return out


def _batches(function: str, calibration_batches: Any) -> list:
    if calibration_batches is None:
        return []
    batches = list(calibration_batches)
    for batch in batches:
        if not hasattr(batch, "keys") and not hasattr(batch, "shape"):
            raise TypeError(
                f"[{function}] a calibration batch must be a dict of tensors or a tensor of input ids, "
                f"got {type(batch).__name__}"
            )
    return batches


def _run(model: Any, batch: Any) -> Any:
    return model(**batch) if hasattr(batch, "keys") else model(batch)


def _linear_layers(model: Any, skip: Sequence[str]) -> list[tuple[str, Any]]:
    import torch

    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(part in name for part in skip)
    ]


def _activation_sensitivity(model: Any, layers: list, batches: list) -> dict[str, np.ndarray]:
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in layers]
    try:
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for name, module in layers:
        if name not in sums:
            continue
        mean_square = (sums[name] / counts[name]).float().numpy()
        result[name] = np.ascontiguousarray(
            np.broadcast_to(mean_square, tuple(module.weight.shape)), np.float32
        )
    return result


def _fisher_sensitivity(
    fn: str, model: Any, layers: list, batches: list, loss_fn: Callable | None
) -> dict[str, np.ndarray]:
    import torch

    squares = {name: torch.zeros_like(module.weight, dtype=torch.float32) for name, module in layers}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            if loss_fn is not None:
                loss = loss_fn(model, batch)
            else:
                output = _run(model, batch)
                loss = getattr(output, "loss", None)
                if loss is None:
                    raise ValueError(
                        f"[{fn}] sensitivity='fisher' needs a batch that yields a loss "
                        "(e.g. labels for a causal LM) or a loss_fn(model, batch)"
                    )
            loss.backward()
            for name, module in layers:
                if module.weight.grad is not None:
                    squares[name] += module.weight.grad.detach().float() ** 2
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {name: (square / max(len(batches), 1)).numpy() for name, square in squares.items()}


def compute_sensitivity(
    model: Any,
    calibration_batches: Iterable[Any] | None,
    kind: str = "activation",
    *,
    skip: Sequence[str] = ("lm_head",),
    loss_fn: Callable[[Any, Any], Any] | None = None,
) -> dict[str, np.ndarray]:
    """Per-layer sensitivity (layer name -> float32 array of the weight's shape) for ``halo_quantize_model``:
    ``"activation"``, ``"fisher"`` (mean squared gradient per weight) or ``"magnitude"`` (empty: |w|)."""
    return _sensitivity("compute_sensitivity", model, calibration_batches, kind, skip, loss_fn)


def _sensitivity(
    fn: str, model: Any, calibration_batches: Any, kind: str, skip: Sequence[str], loss_fn: Callable | None
) -> dict[str, np.ndarray]:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"[{fn}] model must be a torch.nn.Module, got {type(model).__name__}")
    if kind not in SENSITIVITIES:
        raise ValueError(f"[{fn}] sensitivity must be one of {SENSITIVITIES}, got {kind!r}")
    batches = _batches(fn, calibration_batches)
    if kind != "magnitude" and not batches:
        raise ValueError(f"[{fn}] sensitivity={kind!r} needs at least one calibration batch")
    layers = _linear_layers(model, skip)
    if kind == "activation":
        return _activation_sensitivity(model, layers, batches)
    if kind == "fisher":
        return _fisher_sensitivity(fn, model, layers, batches, loss_fn)
    return {}


def halo_quantize_model(
    model: Any,
    calibration_batches: Iterable[Any] | None,
    *,
    sensitivity: str | Mapping[str, Any] = "activation",
    hw: HardwareModel | None = None,
    tile: Sequence[int] = (128, 128),
    salient_fraction: float = 5e-4,
    outlier_sigma: float = 3.0,
    max_switches: int = 3,
    skip: Sequence[str] = ("lm_head",),
    loss_fn: Callable[[Any, Any], Any] | None = None,
    progress: bool = False,
    **options: Any,
) -> ModelReport:
    """Quantizes every nn.Linear (names containing a ``skip`` part are left alone) in place.

    ``sensitivity``: a kind (see :func:`compute_sensitivity`) computed from ``calibration_batches``, or a
    mapping layer name -> array already computed (layers missing from it use |w|). ``options`` go to
    :func:`halo.halo_quantize` (grid, bits, mode, preset, assign, split, tier_fractions, channel_scales,
    book_iterations, energy_weight, tokens, backend). ``progress`` shows a tqdm bar over the layers.
    """
    fn = "halo_quantize_model"
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"[{fn}] model must be a torch.nn.Module, got {type(model).__name__}")
    check_tile(fn, tile)  # before any calibration pass
    layers = _linear_layers(model, skip)
    if not layers:
        raise ValueError(f"[{fn}] the model has no nn.Linear layers to quantize")
    if isinstance(sensitivity, Mapping):
        scores = dict(sensitivity)
    elif sensitivity in SENSITIVITIES:
        scores = _sensitivity(fn, model, calibration_batches, sensitivity, skip, loss_fn)
    else:
        raise ValueError(
            f"[{fn}] sensitivity must be one of {SENSITIVITIES} or a mapping of layer names to arrays, "
            f"got {sensitivity!r}"
        )
    hw = HardwareModel.default() if hw is None else hw
    report = ModelReport()
    iterator = layers
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(layers, desc="halo_quantize", unit="layer")
    for name, module in iterator:
        weight = module.weight.detach().float().cpu().numpy().copy()  # the write-back below must not alias it
        score = scores.get(name)
        quantized = halo_quantize(
            weight, score, hw, tile, salient_fraction, outlier_sigma, max_switches, **options
        )
        restored = quantized.dequantize()
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(restored).to(module.weight.dtype))
        est = quantized.estimate()
        report.quantized[name] = quantized
        report.layers.append(
            LayerReport(
                name,
                weight.shape,
                weighted_error(weight, restored, score),
                est.average_bits,
                est.speedup,
                est.energy_saving,
                quantized.plan.switches,
                quantized.sparse.nnz / weight.size,
                est.latency_ns,
                est.baseline_latency_ns,
                est.energy_nj,
                est.baseline_energy_nj,
                est,
            )
        )
    return report
