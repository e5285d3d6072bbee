"""halo.matmul_4bit / matmul_4bit_transposed: against x @ dequantize_4bit(W, x.dtype).T
summed in float64 (an independent computation), against bitsandbytes' Linear4bit, and
the Python boundary (kinds, dtypes, shapes, out=, bias, errors, the absmax cache).

Tolerance: |y - ref| <= 2e-5 * sum|x w| + half an ulp of the output dtype at |ref|."""

from __future__ import annotations

import logging
from pathlib import Path

import halo
import numpy as np
import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes (the reference) is not installed")

CPU_BACKENDS = [b for b in halo.backends() if b != "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF_ULP = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ROOT = Path(__file__).resolve().parents[2]


def reference(x: torch.Tensor, qt, bias=None, transposed=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ W.T + bias, sum |x w|) in float64, W = dequantize_4bit(qt, x.dtype)."""
    w = halo.dequantize_4bit(qt, dtype=x.dtype)
    w = (torch.from_numpy(w) if isinstance(w, np.ndarray) else w).double()
    w = w if transposed else w.T
    xd = x.double().reshape(-1, x.shape[-1])
    y = xd @ w
    magnitude = xd.abs() @ w.abs()
    if bias is not None:
        y = y + bias.to(x.dtype).double()
        magnitude = magnitude + bias.to(x.dtype).double().abs()
    return y, magnitude


def assert_close(got: torch.Tensor, x: torch.Tensor, qt, bias=None, transposed=False):
    ref, magnitude = reference(x, qt, bias, transposed)
    got = got.double().reshape(ref.shape)
    nan = ref.isnan()
    assert torch.equal(got.isnan(), nan)
    inf = ref.isinf()
    assert torch.equal(got[inf], ref[inf])
    finite = ~(nan | inf)
    tolerance = 2e-5 * magnitude + HALF_ULP[x.dtype] * ref.abs() + 1e-30
    excess = ((got - ref).abs() - tolerance)[finite]
    assert excess.numel() == 0 or excess.max().item() <= 0, f"worst excess {excess.max().item():.3g}"


def quantized(
    out_features, in_features, quant_type="nf4", blocksize=64, double_quant=True, seed=0, kind="torch"
):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    return halo.quantize_4bit(w if kind == "torch" else w.numpy(), quant_type, blocksize, double_quant)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "shape, blocksize, quant_type",
    [
        ((40, 128), 64, "nf4"),
        ((37, 576), 128, "nf4"),
        ((9, 100), 64, "fp4"),
        ((16, 64), 32, "nf4"),
        ((7, 33), 32, "fp4"),
    ],
)
def test_forward_matches_float64_reference(dtype, backend, shape, blocksize, quant_type):
    qt = quantized(*shape, quant_type=quant_type, blocksize=blocksize, seed=shape[0])
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(shape[0], generator=gen)
    for rows in (1, 2, 3, 7, 16, 17, 33):
        x = torch.randn(rows, shape[1], generator=gen).to(dtype)
        y = halo.matmul_4bit(x, qt, backend=backend)
        assert isinstance(y, torch.Tensor) and y.dtype == dtype and tuple(y.shape) == (rows, shape[0])
        assert_close(y, x, qt)
        assert_close(halo.matmul_4bit(x, qt, bias=bias, backend=backend), x, qt, bias)
        g = torch.randn(rows, shape[0], generator=gen).to(dtype)
        assert_close(halo.matmul_4bit_transposed(g, qt, backend=backend), g, qt, transposed=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_agree_with_the_scalar_reference(backend):
    qt = quantized(48, 256, seed=3)
    x = torch.randn(5, 256)
    scalar = halo.matmul_4bit(x, qt, backend="scalar")
    assert torch.allclose(halo.matmul_4bit(x, qt, backend=backend), scalar, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_in_x(dtype):
    qt = quantized(19, 128, seed=4)
    x = torch.randn(4, 128).to(dtype)
    x[0, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3, 7] = float("-inf")
    for backend in CPU_BACKENDS:
        y = halo.matmul_4bit(x, qt, backend=backend)
        assert y[0].isnan().all()
        assert y[1].isfinite().all()
        assert_close(y, x, qt)


def test_any_leading_shape_and_layout():
    qt = quantized(24, 64, seed=5)
    x = torch.randn(64, 2, 3).permute(1, 2, 0)  # [2, 3, 64], not contiguous
    y = halo.matmul_4bit(x, qt)
    assert y.shape == (2, 3, 24)
    assert_close(y, x.contiguous(), qt)
    assert halo.matmul_4bit(torch.randn(64), qt).shape == (24,)
    assert halo.matmul_4bit(torch.randn(0, 64), qt).shape == (0, 24)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_torch_fast_path_equals_the_general_path(dtype):
    """A contiguous CPU tensor with no bias, out or backend takes a shorter route (fewer checks,
    host pointers); with out= the same call goes the general way. Both must agree bit for bit
    on every leading shape, on views that start inside their storage, and with grad."""
    qt = quantized(40, 128, seed=9)
    gen = torch.Generator().manual_seed(2)
    big = torch.randn(6, 128, generator=gen).to(dtype)
    cases = [big[0], big[:1], big[2:5], big.reshape(2, 3, 128), big[:0], big[1:4].clone().requires_grad_()]
    for x in cases:
        for transposed, qx in ((False, x), (True, torch.randn(*x.shape[:-1], 40, generator=gen).to(dtype))):
            op = halo.matmul_4bit_transposed if transposed else halo.matmul_4bit
            fast = op(qx, qt)
            general = torch.empty_like(fast)
            op(qx, qt, out=general)
            assert fast.shape == general.shape and fast.dtype == dtype and not fast.requires_grad
            assert torch.equal(
                fast.view(torch.int16 if dtype != torch.float32 else torch.int32),
                general.view(torch.int16 if dtype != torch.float32 else torch.int32),
            )
            if qx.numel():
                assert_close(fast, qx.detach(), qt, transposed=transposed)
    with pytest.raises(ValueError, match="matmul_4bit"):
        halo.matmul_4bit(torch.randn(2, 127).to(dtype), qt)  # a wrong width still gets the general error


def test_numpy_in_numpy_out():
    qt = quantized(24, 64, seed=6, kind="numpy")
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    y = halo.matmul_4bit(x, qt)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (3, 24)
    assert_close(torch.from_numpy(y), torch.from_numpy(x), qt)
    y16 = halo.matmul_4bit(x.astype(np.float16), qt)
    assert y16.dtype == np.float16
    big_endian = x.astype(">f4")
    assert np.array_equal(halo.matmul_4bit(big_endian, qt), y)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    yb = halo.matmul_4bit(x.astype(ml_dtypes.bfloat16), qt)
    assert yb.dtype == ml_dtypes.bfloat16 and yb.shape == (3, 24)


def test_bias_in_any_float_dtype_is_cast_to_x():
    qt = quantized(24, 64, seed=7)
    x = torch.randn(3, 64).to(torch.bfloat16)
    bias = torch.randn(24, dtype=torch.float64).numpy()
    y = halo.matmul_4bit(x, qt, bias=torch.from_numpy(bias).float())
    assert_close(y, x, qt, torch.from_numpy(bias).float())
    with pytest.raises(ValueError, match="bias has 23 elements"):
        halo.matmul_4bit(x, qt, bias=torch.randn(23))
    with pytest.raises(TypeError, match="bias"):
        halo.matmul_4bit(x, qt, bias=torch.ones(24, dtype=torch.int32))


def test_out_is_written_in_place():
    qt = quantized(24, 64, seed=8)
    x = torch.randn(2, 3, 64)
    out = torch.empty(2, 3, 24)
    assert halo.matmul_4bit(x, qt, out=out) is out
    assert torch.equal(out, halo.matmul_4bit(x, qt))
    out_t = torch.empty(2, 3, 64)
    assert halo.matmul_4bit_transposed(torch.randn(2, 3, 24), qt, out=out_t) is out_t
    with pytest.raises(TypeError, match="out has dtype"):
        halo.matmul_4bit(x, qt, out=torch.empty(6, 24, dtype=torch.float16))
    with pytest.raises(ValueError, match="out holds 24 elements"):
        halo.matmul_4bit(x, qt, out=torch.empty(24))
    with pytest.raises(TypeError, match="out must be"):
        halo.matmul_4bit(x, qt, out=[0.0] * 144)
    square = torch.ones(6, 24)
    with pytest.raises(ValueError, match="overlaps"):
        halo.matmul_4bit(square, quantized(24, 24), out=square)


def test_bad_arguments_name_the_function():
    qt = quantized(24, 64, seed=9)
    with pytest.raises(TypeError, match=r"\[matmul_4bit\] W must be a QuantizedTensor"):
        halo.matmul_4bit(torch.randn(2, 64), torch.randn(24, 64))
    with pytest.raises(ValueError, match=r"\[matmul_4bit\] x has shape \(2, 63\), expected \[\.\.\., 64\]"):
        halo.matmul_4bit(torch.randn(2, 63), qt)
    with pytest.raises(TypeError, match="matmul_4bit"):
        halo.matmul_4bit(torch.ones(2, 64, dtype=torch.int64), qt)
    with pytest.raises(TypeError, match="matmul_4bit"):
        halo.matmul_4bit([[1.0] * 64], qt)
    with pytest.raises(ValueError, match="backend must be one of"):
        halo.matmul_4bit(torch.randn(2, 64), qt, backend="gpu")
    flat = halo.quantize_4bit(torch.randn(64))
    with pytest.raises(ValueError, match="must be 2-D"):
        halo.matmul_4bit(torch.randn(2, 64), flat)
    with pytest.raises(ValueError, match="x has shape"):
        halo.matmul_4bit_transposed(torch.randn(2, 64), qt)


def test_decoded_absmax_is_cached_until_the_statistics_change():
    qt = quantized(24, 64, seed=10)
    first = qt.block_absmax()
    assert qt.block_absmax() is first
    assert not first.flags.writeable
    expected = halo._core.quant.double_dequantize(qt.absmax, qt.nested_absmax, qt.nested_offset, 256)
    assert np.array_equal(first, expected)
    qt.nested_absmax = qt.nested_absmax * 2
    second = qt.block_absmax()
    assert second is not first
    assert not np.array_equal(first, second)
    y = halo.matmul_4bit(torch.eye(64)[:1], qt)
    assert_close(y, torch.eye(64)[:1], qt)


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 40])
def test_matches_bitsandbytes_linear4bit(dtype, rows):
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 96, bias=True)
    layer = bnb.nn.Linear4bit(
        256, 96, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True
    )
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    qt = halo.QuantizedTensor.from_bnb_state_dict(layer.state_dict(), "weight")
    x = torch.randn(rows, 256).to(dtype)
    with torch.no_grad():
        expected = layer(x).double()
    got = halo.matmul_4bit(x, qt, bias=layer.bias.detach()).double()
    # bitsandbytes rounds x W^T to the compute dtype before adding the bias: allow two roundings.
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= (1e-5 if dtype == torch.float32 else 2**-7) * scale


def test_real_model_projection(smollm2_dir):
    path = smollm2_dir / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")  # [1536, 576]
    qt = halo.quantize_4bit(w, "nf4", 64, double_quant=True)
    x = torch.randn(5, 576)
    for dtype in (torch.float32, torch.bfloat16):
        assert_close(halo.matmul_4bit(x.to(dtype), qt), x.to(dtype), qt)
        g = torch.randn(5, 1536).to(dtype)
        assert_close(halo.matmul_4bit_transposed(g, qt), g, qt, transposed=True)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and halo.built_with_cuda()),
    reason="needs a CUDA GPU and halo built with CUDA (this machine or build has none)",
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_tensors(dtype):
    qt = quantized(96, 200, seed=11)
    for rows in (1, 3, 17):
        x = torch.randn(rows, 200).to(dtype)
        bias = torch.randn(96)
        y = halo.matmul_4bit(x.cuda(), qt, bias=bias.cuda())
        assert y.is_cuda and y.dtype == dtype
        assert_close(y.cpu(), x, qt, bias)
        g = torch.randn(rows, 96).to(dtype)
        assert_close(halo.matmul_4bit_transposed(g.cuda(), qt).cpu(), g, qt, transposed=True)


def test_large_results_reuse_memory_without_changing_values():
    """Arrays of >= 1 MiB returned by dequantize_4bit / matmul_4bit come from a cache of
    blocks earlier results gave back (no page faults for fresh pages on every call)."""
    qt = quantized(1024, 512, seed=12)  # 2 MiB as float32
    first = halo.dequantize_4bit(qt, dtype="float32")
    expected = first.clone()
    address = first.data_ptr()
    del first
    blocks, cached = halo._core.quant.array_cache_state()
    assert blocks >= 1 and cached >= 2 * 2**20
    again = halo.dequantize_4bit(qt, dtype="float32")
    assert again.data_ptr() == address
    assert torch.equal(again, expected)
    x = torch.randn(600, 512)  # a 600 x 1024 float32 result: 2.3 MiB
    y1 = halo.matmul_4bit(x, qt)
    reference = y1.clone()
    del y1
    y2 = halo.matmul_4bit(x, qt)
    assert torch.equal(y2, reference)
    small = halo.matmul_4bit(torch.randn(1, 512), qt)  # small results are plain arrays
    assert small.shape == (1, 1024)
