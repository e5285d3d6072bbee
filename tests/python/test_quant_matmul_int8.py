"""halo.matmul_4bit(..., activations="int8"): against an independent NumPy evaluation of the
int8 scheme (x quantized per 8 elements, d = max|x| / 127, q = rint(x * (1 / d)); the
NF4/FP4 codes as rint(code * S), S = 127 / 120; scales d * absmax / S), every CPU entry
against the scalar one, its error against the exact product bounded, and the boundary
(fast path, bad values, the registry)."""

from __future__ import annotations

import halo
import numpy as np
import pytest
import torch

CPU_BACKENDS = [b for b in halo.backends() if b != "cuda"]
HALF_ULP = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SCALE = {"nf4": 127, "fp4": 120}


def quantized(out_features, in_features, quant_type="nf4", blocksize=64, double_quant=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    return halo.quantize_4bit(w, quant_type, blocksize, double_quant)


def codes(qt) -> np.ndarray:
    """The 4-bit codes [out, in] (bitsandbytes: the high nibble holds the even element)."""
    packed = np.asarray(qt.packed).reshape(-1)
    both = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)
    out_features, in_features = qt.shape
    return both[: out_features * in_features].reshape(out_features, in_features).astype(np.int64)


def numpy_int8(x: torch.Tensor, qt) -> tuple[np.ndarray, np.ndarray]:
    """(y, sum |x w|) in float64 from the scheme's words; x [rows, in] float."""
    xf = x.float().numpy().astype(np.float32)
    rows, n = xf.shape
    xq = np.zeros((rows, n), dtype=np.float64)
    for k0 in range(0, n, 8):
        block = xf[:, k0 : k0 + 8]
        d = (np.abs(block).max(axis=1) / np.float32(127)).astype(np.float32)
        inverse = np.where(d > 0, np.float32(1) / np.where(d > 0, d, np.float32(1)), np.float32(0)).astype(
            np.float32
        )
        q = np.rint(block * inverse[:, None])
        assert np.abs(q).max() <= 127
        xq[:, k0 : k0 + 8] = q.astype(np.float64) * d[:, None].astype(np.float64)
    book = np.asarray(halo._core.quant.code_book(qt.quant_type), dtype=np.float32)
    s = SCALE[qt.quant_type]
    code8 = np.rint(book * np.float32(s)).astype(np.float64)
    out_features, in_features = qt.shape
    absmax = np.asarray(qt.block_absmax(), dtype=np.float64)
    flat = np.arange(out_features * in_features) // qt.blocksize
    scale = (absmax[flat] / s).reshape(out_features, in_features)
    w8 = code8[codes(qt)] * scale
    w = np.asarray(halo.dequantize_4bit(qt, dtype=torch.float32)).astype(np.float64)
    return xq @ w8.T, np.abs(xf.astype(np.float64)) @ np.abs(w).T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape, blocksize, quant_type, double_quant",
    [
        ((40, 128), 64, "nf4", True),
        ((37, 576), 128, "nf4", False),
        ((9, 100), 64, "fp4", True),
        ((16, 64), 32, "nf4", True),
        ((7, 33), 32, "fp4", False),
        ((6, 192), 4096, "fp4", True),
    ],
)
def test_int8_equals_the_numpy_scheme(dtype, shape, blocksize, quant_type, double_quant):
    qt = quantized(
        *shape, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, seed=shape[0]
    )
    gen = torch.Generator().manual_seed(2)
    for rows in (1, 2, 5, 8, 9, 17):
        x = (torch.randn(rows, shape[1], generator=gen) * 3).to(dtype)
        y = halo.matmul_4bit(x, qt, activations="int8")
        assert isinstance(y, torch.Tensor) and y.dtype == dtype and tuple(y.shape) == (rows, shape[0])
        expected, magnitude = numpy_int8(x, qt)
        tolerance = 1e-5 * magnitude + HALF_ULP[dtype] * np.abs(expected) + 1e-30
        assert (np.abs(y.double().numpy() - expected) <= tolerance).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_every_backend_equals_the_scalar_entry(backend, monkeypatch):
    qt = quantized(48, 576, seed=3)
    x = torch.randn(5, 576)
    scalar = halo.matmul_4bit(x, qt, backend="scalar", activations="int8")
    assert torch.allclose(
        halo.matmul_4bit(x, qt, backend=backend, activations="int8"), scalar, rtol=1e-5, atol=1e-5
    )
    if backend == "avx2":  # the plain AVX2 kernel, also on a CPU with AVX-VNNI
        monkeypatch.setenv("HALO_DISABLE_AVX_VNNI", "1")
        assert (
            halo._core.quant.matmul_4bit_variant("float32", 5, 48, 576, 64, False, "avx2", "int8") == "avx2"
        )
        assert torch.allclose(
            halo.matmul_4bit(x, qt, backend="avx2", activations="int8"), scalar, rtol=1e-5, atol=1e-5
        )


def test_int8_error_against_the_exact_product_is_bounded():
    qt = quantized(256, 1024, seed=4)
    x = torch.randn(8, 1024)
    exact = halo.matmul_4bit(x, qt).double()
    int8 = halo.matmul_4bit(x, qt, activations="int8").double()
    relative = ((int8 - exact).norm() / exact.norm()).item()
    assert 0 < relative < 0.015  # measured 0.5-0.8 %: int8 steps of x and of the code book


def test_int8_fast_path_numpy_and_out_agree():
    qt = quantized(24, 128, seed=5)
    x = torch.randn(3, 128)
    fast = halo.matmul_4bit(x, qt, activations="int8")  # torch CPU tensor: the pointer path
    general = halo.matmul_4bit(x.numpy(), qt, activations="int8")
    out = torch.empty(3, 24)
    halo.matmul_4bit(x, qt, out=out, activations="int8")
    assert torch.equal(fast, torch.from_numpy(general)) and torch.equal(fast, out)
    assert not torch.equal(fast, halo.matmul_4bit(x, qt))


def test_int8_nan_in_x_poisons_its_row_only():
    qt = quantized(8, 128, seed=6)
    x = torch.randn(3, 128)
    x[1, 77] = float("nan")
    y = halo.matmul_4bit(x, qt, activations="int8")
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


def test_int8_bad_values_name_the_function():
    qt = quantized(24, 64, seed=9)
    x = torch.randn(2, 64)
    for bad in ("INT8", "fp8", "", None, 8):
        with pytest.raises(ValueError, match=r"\[matmul_4bit\] activations must be 'exact' or 'int8', got"):
            halo.matmul_4bit(x, qt, activations=bad)
    packed, absmax = qt.kernel_arrays()
    args = (x.numpy().reshape(-1), "float32", 2, packed, absmax, "nf4", 64, 24, 64)
    with pytest.raises(ValueError, match=r"\[matmul_4bit\] activations must be 'exact' or 'int8', got 'q8'"):
        halo._core.quant.matmul_4bit(*args, activations="q8")
    with pytest.raises(
        ValueError, match=r"\[matmul_4bit_transposed\] int8 activations are for matmul_4bit only"
    ):
        halo._core.quant.matmul_4bit(
            torch.randn(2, 24).numpy().reshape(-1),
            "float32",
            2,
            packed,
            absmax,
            "nf4",
            64,
            24,
            64,
            transposed=True,
            activations="int8",
        )
    with pytest.raises(ValueError, match=r"\[matmul_4bit\] x has shape"):
        halo.matmul_4bit(torch.randn(2, 63), qt, activations="int8")


def test_int8_kernels_are_registry_entries():
    entries = halo.kernels()["matmul_4bit_int8"]
    assert entries == ["scalar", "avx2", "avx2-vnni", "avx512", "avx512-vnni"]
    variants = {
        name: (rung, feature)
        for name, rung, feature, _ in halo._core.backend.kernel_variants()["matmul_4bit_int8"]
    }
    assert variants["avx2-vnni"] == ("avx2", "avx_vnni")
    assert variants["avx512-vnni"] == ("avx512", "avx512_vnni")


def test_linear4bit_int8_inference_mode_and_exact_training():
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 40)
    layer = halo.nn.Linear4bit.from_linear(dense)
    qt = halo.QuantizedTensor.from_bnb_state_dict(layer.state_dict(), "weight")
    x = torch.randn(3, 128)
    exact = halo.matmul_4bit(x, qt, bias=dense.bias.detach())
    int8 = halo.matmul_4bit(x, qt, bias=dense.bias.detach(), activations="int8")
    assert not torch.equal(exact, int8)
    with torch.no_grad():
        assert torch.equal(layer(x), exact)
        layer.activations = "int8"
        assert torch.equal(layer(x), int8)
    # an input that needs a gradient keeps the exact product, and its backward runs
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    assert torch.equal(y.detach(), exact)
    y.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape
    layer.activations = "fp8"
    with pytest.raises(
        ValueError, match=r"\[Linear4bit.forward\] activations must be 'exact' or 'int8', got 'fp8'"
    ):
        layer(x)


def test_the_torch_op_takes_int8_and_refuses_its_backward():
    layer = halo.nn.Linear4bit.from_linear(torch.nn.Linear(64, 16, bias=False))
    args = (
        layer.packed,
        layer.weight_absmax,
        layer.weight_nested_absmax,
        float(layer.nested_offset),
        16,
        "nf4",
        64,
        None,
    )
    x = torch.randn(2, 64)
    torch.library.opcheck(torch.ops.halo.matmul_4bit, (x, *args, "int8"))
    with pytest.raises(
        ValueError, match=r"\[halo::matmul_4bit\] activations must be 'exact' or 'int8', got 'q4'"
    ):
        torch.ops.halo.matmul_4bit(x, *args, "q4")
    y = torch.ops.halo.matmul_4bit(x.clone().requires_grad_(True), *args, "int8")
    with pytest.raises(RuntimeError, match=r"\[halo::matmul_4bit\] activations='int8' is for inference"):
        y.sum().backward()
