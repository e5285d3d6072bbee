"""halo's LoRA math against PEFT (and bitsandbytes) on tiny models built from
configs with fixed seeds, and against independent torch/NumPy computations."""

from __future__ import annotations

import copy
import warnings

import halo
import numpy as np
import pytest
import tiny_models
import torch
from halo.lora import dropout_mask, lora_scaling, merge, unmerge
from halo.lora.autograd import lora_linear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402 - after the importorskip guards

warnings.filterwarnings("ignore", category=UserWarning)


def tiny_llama(seed: int = 0):
    return tiny_models.llama(seed, intermediate_size=96, vocab_size=128)


def tiny_gpt2(seed: int = 0):
    return tiny_models.gpt2(seed, n_embd=48, vocab_size=128, n_positions=64)


def peft_llama(
    use_rslora=False, r=8, alpha=16, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"), seed=0
):
    model = tiny_llama(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        use_rslora=use_rslora,
        init_lora_weights=False,  # non-zero B, so the adapter actually contributes
    )
    torch.manual_seed(seed + 1)
    return get_peft_model(model, config)


def lora_layers(peft_model):
    return {
        name: module
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }


def layer_parts(layer):
    return (
        layer.get_base_layer().weight.detach(),
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.scaling["default"],
        layer.get_base_layer().bias,
    )


def rel_err(got, want) -> float:
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


# -- forward and gradients against PEFT --------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_gradients_match_peft_layers(use_rslora):
    model = peft_llama(use_rslora=use_rslora)
    layers = lora_layers(model)
    assert len(layers) == 6
    torch.manual_seed(5)
    for name, layer in layers.items():
        weight, lora_a, lora_b, scaling, bias = layer_parts(layer)
        r = lora_a.shape[0]
        assert scaling == pytest.approx(lora_scaling(16, r, use_rslora)), name
        x = torch.randn(3, 7, weight.shape[1])
        grad_y = torch.randn(3, 7, weight.shape[0])

        x_peft = x.clone().requires_grad_(True)
        layer.zero_grad()
        y_peft = layer(x_peft)
        y_peft.backward(grad_y)

        x_halo = x.clone().requires_grad_(True)
        a_halo = lora_a.detach().clone().requires_grad_(True)
        b_halo = lora_b.detach().clone().requires_grad_(True)
        y_halo = lora_linear(x_halo, weight, a_halo, b_halo, scaling, bias=bias)
        y_halo.backward(grad_y)

        assert rel_err(y_halo, y_peft) < 1e-5, name
        assert rel_err(x_halo.grad, x_peft.grad) < 1e-5, name
        assert rel_err(a_halo.grad, lora_a.grad) < 1e-5, name
        assert rel_err(b_halo.grad, lora_b.grad) < 1e-5, name


def test_gpt2_conv1d_fan_in_fan_out_matches_peft():
    model = tiny_gpt2()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )
    torch.manual_seed(3)
    peft_model = get_peft_model(model, config)
    layers = lora_layers(peft_model)
    assert len(layers) == 4
    reference = copy.deepcopy(peft_model).merge_and_unload()
    merged = dict(reference.named_parameters())
    for name, layer in layers.items():
        weight, lora_a, lora_b, scaling, bias = layer_parts(layer)  # Conv1D: weight is [in, out]
        x = torch.randn(2, 5, weight.shape[0])
        grad_y = torch.randn(2, 5, weight.shape[1])
        x_peft = x.clone().requires_grad_(True)
        layer.zero_grad()
        layer(x_peft).backward(grad_y)
        y_peft = layer(x)
        x_halo = x.clone().requires_grad_(True)
        a_halo = lora_a.detach().clone().requires_grad_(True)
        b_halo = lora_b.detach().clone().requires_grad_(True)
        y_halo = lora_linear(x_halo, weight, a_halo, b_halo, scaling, bias=bias, fan_in_fan_out=True)
        y_halo.backward(grad_y)
        assert rel_err(y_halo, y_peft) < 1e-5
        assert rel_err(x_halo.grad, x_peft.grad) < 1e-5
        assert rel_err(a_halo.grad, lora_a.grad) < 1e-5
        assert rel_err(b_halo.grad, lora_b.grad) < 1e-5
        key = name.replace("base_model.model.", "") + ".weight"
        ours = merge(weight, lora_a.detach(), lora_b.detach(), scaling, fan_in_fan_out=True)
        assert rel_err(ours, merged[key].detach()) < 1e-6, key


# -- merge / unmerge against PeftModel.merge_and_unload -----------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_matches_merge_and_unload(use_rslora):
    model = peft_llama(use_rslora=use_rslora, r=4, alpha=12)
    layers = lora_layers(model)
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    for name, layer in layers.items():
        weight, lora_a, lora_b, scaling, _ = layer_parts(layer)
        key = name.replace("base_model.model.", "") + ".weight"
        ours = merge(weight, lora_a.detach(), lora_b.detach(), scaling)
        assert isinstance(ours, torch.Tensor) and ours.dtype == torch.float32 and ours.shape == weight.shape
        assert rel_err(ours, merged[key].detach()) < 1e-6, key
        # NumPy in, NumPy out; unmerge gives the base back up to rounding
        ours_np = merge(weight.numpy(), lora_a.detach().numpy(), lora_b.detach().numpy(), scaling)
        assert isinstance(ours_np, np.ndarray)
        np.testing.assert_array_equal(ours_np, ours.numpy())
        back = unmerge(ours_np, lora_a.detach().numpy(), lora_b.detach().numpy(), scaling)
        np.testing.assert_allclose(back, weight.numpy(), atol=1e-6 * float(np.abs(ours_np).max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge_matches_peft_bitwise(dtype):
    model = peft_llama(r=4, alpha=8, targets=("q_proj",)).to(dtype)
    layers = lora_layers(model)
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    for name, layer in layers.items():
        weight, lora_a, lora_b, scaling, _ = layer_parts(layer)
        ours = merge(weight, lora_a.detach(), lora_b.detach(), scaling)
        assert ours.dtype == dtype
        key = name.replace("base_model.model.", "") + ".weight"
        assert torch.equal(ours, merged[key].detach()), key


# -- 4-bit base ----------------------------------------------------------------------------------

bnb = pytest.importorskip("bitsandbytes")


# bitsandbytes 0.50.2's native CPU dequantizer scrambles values when the last dimension is not a
# multiple of the block size (e.g. [40, 96] with blocksize 64; halo follows its torch reference path
# there), so the comparisons against bitsandbytes use in_features = 128.
def bnb_lora(quant_type: str, double_quant: bool, out_features=40, in_features=128, bias=True):
    return tiny_models.qlora_layer(
        in_features,
        out_features,
        quant_type=quant_type,
        double_quant=double_quant,
        bias=bias,
        r=8,
        alpha=16,
        seed=11,
        lora_seed=12,
    )


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", False)])
def test_4bit_base_matches_bnb_and_peft(quant_type, double_quant):
    layer = bnb_lora(quant_type, double_quant)
    assert type(layer).__module__ == "peft.tuners.lora.bnb"
    base = layer.get_base_layer()
    qt = halo.QuantizedTensor.from_bnb_state_dict(base.state_dict(), "weight")
    assert qt.double_quant == double_quant
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]
    torch.manual_seed(13)
    x = torch.randn(4, 9, 128)
    grad_y = torch.randn(4, 9, 40)

    x_peft = x.clone().requires_grad_(True)
    y_peft = layer(x_peft)
    y_peft.backward(grad_y)

    # independent: bitsandbytes' own dequantization, then plain torch autograd
    w_bnb = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    x_ref = x.clone().requires_grad_(True)
    a_ref = lora_a.detach().clone().requires_grad_(True)
    b_ref = lora_b.detach().clone().requires_grad_(True)
    y_ref = x_ref @ w_bnb.T + base.bias + (x_ref @ a_ref.T @ b_ref.T) * scaling
    y_ref.backward(grad_y)

    for backend in halo.backends():
        x_halo = x.clone().requires_grad_(True)
        a_halo = lora_a.detach().clone().requires_grad_(True)
        b_halo = lora_b.detach().clone().requires_grad_(True)
        y_halo = lora_linear(x_halo, qt, a_halo, b_halo, scaling, bias=base.bias, backend=backend)
        y_halo.backward(grad_y)
        for got, ref, peft_value in (
            (y_halo, y_ref, y_peft),
            (x_halo.grad, x_ref.grad, x_peft.grad),
            (a_halo.grad, a_ref.grad, lora_a.grad),
            (b_halo.grad, b_ref.grad, lora_b.grad),
        ):
            assert rel_err(got, ref) < 1e-5, backend
            assert rel_err(got, peft_value) < 1e-5, backend


def test_4bit_merge_report_against_bitsandbytes():
    torch.manual_seed(21)
    weight = torch.randn(48, 128) * 0.05
    lora_a, lora_b = torch.randn(4, 128) * 0.1, torch.randn(48, 4) * 0.1
    scaling = 2.0
    qt = halo.quantize_4bit(weight, quant_type="nf4", blocksize=64, double_quant=True)
    merged_qt, report = merge(qt, lora_a, lora_b, scaling)
    assert isinstance(merged_qt, halo.QuantizedTensor)
    assert (merged_qt.quant_type, merged_qt.blocksize, merged_qt.double_quant) == ("nf4", 64, True)

    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=True
    )
    exact = bnb.functional.dequantize_4bit(packed, state) + (lora_b @ lora_a) * scaling
    packed2, state2 = bnb.functional.quantize_4bit(
        exact, blocksize=64, quant_type="nf4", compress_statistics=True
    )
    np.testing.assert_array_equal(merged_qt.packed.reshape(-1), packed2.numpy().reshape(-1))
    roundtrip = bnb.functional.dequantize_4bit(packed2, state2)
    error = (roundtrip - exact).double()
    assert report.max_abs_error == pytest.approx(float(error.abs().max()), rel=1e-5)
    assert report.rel_frobenius_error == pytest.approx(float(error.norm() / exact.double().norm()), rel=1e-5)
    old = packed.numpy().reshape(-1)
    new = packed2.numpy().reshape(-1)
    changed = np.count_nonzero((old >> 4) != (new >> 4)) + np.count_nonzero((old & 15) != (new & 15))
    assert report.codes_changed_fraction == pytest.approx(changed / weight.numel())
    assert 0.0 < report.codes_changed_fraction < 1.0
    assert report.rel_frobenius_error > 0.0


# -- dropout -----------------------------------------------------------------------------------


def splitmix_mask(seed: int, count: int, p: float) -> np.ndarray:
    """An independent NumPy transcription of the documented RNG."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    keep = (z >> np.uint64(40)) >= np.uint64(int(np.ceil(p * 2**24)))
    return np.where(keep, np.float32(1.0 / (1.0 - p)), np.float32(0.0))


def test_dropout_mask_follows_the_documented_rng():
    mask = dropout_mask(123, (50, 40), 0.3)
    np.testing.assert_array_equal(mask.reshape(-1), splitmix_mask(123, 2000, 0.3))
    assert 0.2 < np.mean(mask == 0) < 0.4


def test_dropout_is_deterministic_and_backward_uses_the_same_mask():
    torch.manual_seed(31)
    weight = torch.randn(24, 40)
    lora_a, lora_b = torch.randn(4, 40), torch.randn(24, 4)
    x = torch.randn(6, 40)
    y1 = lora_linear(x, weight, lora_a, lora_b, 0.5, dropout=0.25, seed=7)
    y2 = lora_linear(x, weight, lora_a, lora_b, 0.5, dropout=0.25, seed=7)
    y3 = lora_linear(x, weight, lora_a, lora_b, 0.5, dropout=0.25, seed=8)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    # no dropout outside training
    y_eval = lora_linear(x, weight, lora_a, lora_b, 0.5, dropout=0.25, training=False)
    y_plain = lora_linear(x, weight, lora_a, lora_b, 0.5)
    assert torch.equal(y_eval, y_plain)
    # seed drawn from torch's generator when not given
    torch.manual_seed(99)
    y4 = lora_linear(x, weight, lora_a, lora_b, 0.5, dropout=0.25)
    torch.manual_seed(99)
    assert torch.equal(y4, lora_linear(x, weight, lora_a, lora_b, 0.5, dropout=0.25))
    # forward and gradients equal torch autograd with the documented mask
    mask = torch.from_numpy(splitmix_mask(7, x.numel(), 0.25).reshape(x.shape))
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    as_ = [lora_a.clone().requires_grad_(True) for _ in range(2)]
    bs = [lora_b.clone().requires_grad_(True) for _ in range(2)]
    grad_y = torch.randn(6, 24)
    lora_linear(xs[0], weight, as_[0], bs[0], 0.5, dropout=0.25, seed=7).backward(grad_y)
    ref = xs[1] @ weight.T + ((xs[1] * mask) @ as_[1].T @ bs[1].T) * 0.5
    ref.backward(grad_y)
    assert rel_err(y1, ref) < 1e-5
    for got, want in ((xs[0].grad, xs[1].grad), (as_[0].grad, as_[1].grad), (bs[0].grad, bs[1].grad)):
        assert rel_err(got, want) < 1e-5


def test_4bit_base_dropout_and_fan_in_fan_out_follow_the_documented_mask():
    """The 4-bit path (matmul kernels + torch LoRA products) against torch autograd on
    the dequantized weight with the documented mask, both weight orientations."""
    torch.manual_seed(33)
    x = torch.randn(2, 5, 64)
    lora_a, lora_b = torch.randn(4, 64), torch.randn(48, 4)
    grad_y = torch.randn(2, 5, 48)
    mask = torch.from_numpy(splitmix_mask(9, x.numel(), 0.3).reshape(x.shape))
    for fan_in_fan_out in (False, True):
        stored = torch.randn(64, 48) if fan_in_fan_out else torch.randn(48, 64)
        qt = halo.quantize_4bit(stored, "nf4", 32, double_quant=True)
        w = halo.dequantize_4bit(qt).T if fan_in_fan_out else halo.dequantize_4bit(qt)
        bias = torch.randn(48)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        as_ = [lora_a.clone().requires_grad_(True) for _ in range(2)]
        bs = [lora_b.clone().requires_grad_(True) for _ in range(2)]
        bias_ = [bias.clone().requires_grad_(True) for _ in range(2)]
        y = lora_linear(
            xs[0], qt, as_[0], bs[0], 0.5, dropout=0.3, seed=9, bias=bias_[0], fan_in_fan_out=fan_in_fan_out
        )
        y.backward(grad_y)
        ref = xs[1] @ w.T + bias_[1] + ((xs[1] * mask) @ as_[1].T @ bs[1].T) * 0.5
        ref.backward(grad_y)
        assert rel_err(y, ref) < 1e-5
        pairs = ((xs[0].grad, xs[1].grad), (as_[0].grad, as_[1].grad), (bs[0].grad, bs[1].grad))
        for got, want in (*pairs, (bias_[0].grad, bias_[1].grad)):
            assert rel_err(got, want) < 1e-5, fan_in_fan_out


@pytest.mark.parametrize("rows", [3, 40])
def test_4bit_base_in_bfloat16_matches_bnb_and_peft(rows):
    """QLoRA's compute dtype: bfloat16 activations and base, float32 adapter (PEFT casts x
    to the adapter's dtype). halo runs the base on the bfloat16 kernels (AMX where present)."""
    torch.manual_seed(21)
    dense = torch.nn.Linear(128, 40, bias=False)
    layer = bnb.nn.Linear4bit(128, 40, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], init_lora_weights=False)
    peft_layer = get_peft_model(tiny_models.OneLayer(layer.to("cpu")), config).base_model.model.proj
    qt = halo.QuantizedTensor.from_bnb_state_dict(peft_layer.get_base_layer().state_dict(), "weight")
    lora_a, lora_b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    x = torch.randn(rows, 128).to(torch.bfloat16)
    grad_y = torch.randn(rows, 40).to(torch.bfloat16)
    x_peft = x.clone().requires_grad_(True)
    y_peft = peft_layer(x_peft)
    y_peft.backward(grad_y)
    for backend in halo.backends():
        x_halo = x.clone().requires_grad_(True)
        a_halo = lora_a.detach().clone().requires_grad_(True)
        b_halo = lora_b.detach().clone().requires_grad_(True)
        y = lora_linear(x_halo, qt, a_halo, b_halo, peft_layer.scaling["default"], backend=backend)
        y.backward(grad_y)
        assert y.dtype == x_halo.grad.dtype == torch.bfloat16
        assert a_halo.grad.dtype == torch.float32
        # bfloat16 results: a few units in the last place of the largest value
        assert rel_err(y, y_peft) < 2e-2, backend
        assert rel_err(x_halo.grad, x_peft.grad) < 2e-2, backend
        assert rel_err(a_halo.grad, lora_a.grad) < 2e-2, backend
        assert rel_err(b_halo.grad, lora_b.grad) < 2e-2, backend


# -- gradcheck in float64 (runs the C++ double kernels) -----------------------------------------


@pytest.mark.parametrize("fan_in_fan_out,dropout", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_gradcheck_float_base(fan_in_fan_out, dropout):
    torch.manual_seed(41)
    weight = (
        torch.randn(9, 7, dtype=torch.float64) if fan_in_fan_out else torch.randn(7, 9, dtype=torch.float64)
    )
    x = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    lora_a = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)

    def fn(x, a, b, bias):
        return lora_linear(
            x, weight, a, b, 1.5, dropout=dropout, bias=bias, fan_in_fan_out=fan_in_fan_out, seed=3
        )

    assert torch.autograd.gradcheck(fn, (x, lora_a, lora_b, bias))


def test_gradcheck_4bit_base():
    torch.manual_seed(42)
    qt = halo.quantize_4bit(torch.randn(7, 64), quant_type="nf4", blocksize=32)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    lora_a = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: lora_linear(x, qt, a, b, 0.5), (x, lora_a, lora_b))


# -- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    weight, lora_a, lora_b = torch.randn(8, 16), torch.randn(4, 16), torch.randn(8, 4)
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match=r"\[lora_linear\] lora_A has shape \(4, 15\)"):
        lora_linear(x, weight, torch.randn(4, 15), lora_b, 1.0)
    with pytest.raises(ValueError, match=r"\[lora_linear\] lora_B has shape \(8, 3\)"):
        lora_linear(x, weight, lora_a, torch.randn(8, 3), 1.0)
    with pytest.raises(ValueError, match=r"\[lora_linear\] x has shape \(3, 15\)"):
        lora_linear(torch.randn(3, 15), weight, lora_a, lora_b, 1.0)
    with pytest.raises(ValueError, match=r"\[lora_linear\] dropout must be .* got 1.0"):
        lora_linear(x, weight, lora_a, lora_b, 1.0, dropout=1.0)
    with pytest.raises(ValueError, match=r"\[lora_linear\] bias has 7 elements"):
        lora_linear(x, weight, lora_a, lora_b, 1.0, bias=torch.randn(7))
    with pytest.raises(TypeError, match=r"\[lora_linear\] x must be a float tensor, got torch.int64"):
        lora_linear(torch.ones(3, 16, dtype=torch.int64), weight, lora_a, lora_b, 1.0)
    with pytest.raises(TypeError, match=r"\[lora_linear\] base must be .* got list"):
        lora_linear(x, [[1.0]], lora_a, lora_b, 1.0)
    with pytest.raises(
        TypeError, match=r"\[lora_linear\] expected a float32, float16 or bfloat16 tensor, got torch.int32"
    ):
        lora_linear(x, torch.ones(8, 16, dtype=torch.int32), lora_a, lora_b, 1.0)
    with pytest.raises(TypeError, match=r"\[merge\] scaling must be a real number, got str"):
        merge(weight, lora_a, lora_b, "2")
    with pytest.raises(ValueError, match=r"\[merge\] lora_A has shape \(4, 8\)"):
        merge(weight, torch.randn(4, 8), lora_b, 1.0)
    with pytest.raises(ValueError, match=r"\[unmerge\] the base weight must be 2-D"):
        unmerge(torch.randn(8), lora_a, lora_b, 1.0)
    with pytest.raises(TypeError, match=r"\[merge\] lora_A must be a float array, got dtype int64"):
        merge(weight.numpy(), np.ones((4, 16), dtype=np.int64), lora_b.numpy(), 1.0)
    with pytest.raises(TypeError, match=r"\[merge\] W must be"):
        merge("weights", lora_a, lora_b, 1.0)
    with pytest.raises(ValueError, match=r"\[lora_forward\] x has shape"):
        halo.lora.lora_forward(
            np.zeros((2, 5), np.float32), weight.numpy(), lora_a.numpy(), lora_b.numpy(), 1.0
        )
    with pytest.raises(TypeError, match=r"\[lora_forward\] x must be float32 or float64, got dtype float16"):
        halo.lora.lora_forward(
            np.zeros((2, 16), np.float16), weight.numpy(), lora_a.numpy(), lora_b.numpy(), 1.0
        )
    with pytest.raises(ValueError, match=r"\[lora_scaling\] r must be a positive integer, got 0"):
        lora_scaling(16, 0)


def test_lora_backward_rejects_lists_naming_the_argument():
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((8, 16)).astype(np.float32)
    lora_a = rng.standard_normal((4, 16)).astype(np.float32)
    lora_b = rng.standard_normal((8, 4)).astype(np.float32)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    grad_y = rng.standard_normal((3, 8)).astype(np.float32)
    backward = halo.lora.lora_backward
    with pytest.raises(TypeError, match=r"\[lora_backward\] grad_y must be a NumPy array like x, got list"):
        backward(grad_y.tolist(), x, weight, lora_a, lora_b, 1.0)
    with pytest.raises(TypeError, match=r"\[lora_backward\] x must be a NumPy array, got list"):
        backward(grad_y, x.tolist(), weight, lora_a, lora_b, 1.0)
    # The same arguments as arrays are accepted, so the errors above come from the list alone.
    grad_x, grad_a, grad_b, grad_bias = backward(grad_y, x, weight, lora_a, lora_b, 1.0)
    assert grad_x.shape == x.shape and grad_a.shape == lora_a.shape and grad_b.shape == lora_b.shape
    assert grad_bias is None


def test_half_precision_inputs_compute_in_float32():
    torch.manual_seed(51)
    weight = torch.randn(12, 20).to(torch.bfloat16)
    x = torch.randn(3, 20).to(torch.bfloat16).requires_grad_(True)
    lora_a = torch.randn(2, 20).to(torch.bfloat16).requires_grad_(True)
    lora_b = torch.randn(12, 2).to(torch.bfloat16).requires_grad_(True)
    y = lora_linear(x, weight, lora_a, lora_b, 0.5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == lora_a.grad.dtype == lora_b.grad.dtype == torch.bfloat16
    xf, af, bf = (t.detach().float().requires_grad_(True) for t in (x, lora_a, lora_b))
    ref = xf @ weight.float().T + (xf @ af.T @ bf.T) * 0.5
    ref.sum().backward()
    assert torch.equal(y, ref.to(torch.bfloat16)) or rel_err(y.float(), ref) < 1e-2
    for got, want in ((x.grad, xf.grad), (lora_a.grad, af.grad), (lora_b.grad, bf.grad)):
        assert rel_err(got.float(), want) < 1e-2


def test_numpy_kernels_with_float64_and_fan_in_fan_out():
    rng = np.random.default_rng(61)
    weight = rng.standard_normal((17, 9))  # [in, out], float64
    lora_a, lora_b = rng.standard_normal((3, 17)), rng.standard_normal((9, 3))
    x = rng.standard_normal((2, 4, 17))
    y = halo.lora.lora_forward(x, weight, lora_a, lora_b, 0.25, fan_in_fan_out=True)
    np.testing.assert_allclose(y, x @ weight + 0.25 * (x @ lora_a.T) @ lora_b.T, rtol=1e-12, atol=1e-12)
    grad_y = rng.standard_normal((2, 4, 9))
    gx, ga, gb, gbias = halo.lora.lora_backward(
        grad_y, x, weight, lora_a, lora_b, 0.25, with_bias=True, fan_in_fan_out=True
    )
    rows, dy = x.reshape(-1, 17), grad_y.reshape(-1, 9)
    np.testing.assert_allclose(
        gx, grad_y @ weight.T + 0.25 * (grad_y @ lora_b) @ lora_a, rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(ga, 0.25 * (dy @ lora_b).T @ rows, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gb, 0.25 * dy.T @ (rows @ lora_a.T), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gbias, dy.sum(axis=0), rtol=1e-12, atol=1e-12)
