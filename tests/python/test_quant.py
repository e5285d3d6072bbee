"""halo's 4-bit quantization against bitsandbytes (the reference) on the CPU:
packed bytes, absmax (plain and nested), dequantized values and state dicts."""

from __future__ import annotations

import json
import logging

import halo
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
try:  # the reference; tests that only need NumPy/torch run without it
    import bitsandbytes as bnb
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    F = bnb.functional
except ImportError:
    bnb = F = _dequantize_4bit_compute = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes (the reference) is not installed")

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CPU_BACKENDS = [b for b in halo.backends() if b != "cuda"]


def reference(w: torch.Tensor, quant_type: str, blocksize: int, nested: bool):
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return packed, state


def bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy()
    return t.view(torch.int32).numpy() if t.dtype == torch.float32 else t.numpy()


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
# 4095 and 8191 are one short of a multiple of every block size (the AVX-512 tail case).
@pytest.mark.parametrize(
    "shape", [(1,), (33,), (7, 65), (64, 129), (300, 70), (4097,), (4095,), (3, 2730 + 1), (8191,)]
)
def test_bit_exact_with_bitsandbytes(quant_type, blocksize, dtype, shape):
    gen = torch.Generator().manual_seed(hash((quant_type, blocksize, str(dtype), shape)) % 2**31)
    w = torch.randn(shape, generator=gen).to(dtype)
    packed, state = reference(w, quant_type, blocksize, nested=False)
    for backend in CPU_BACKENDS:
        qt = halo.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, backend=backend)
        assert np.array_equal(qt.packed, packed.numpy()), backend
        assert np.array_equal(bits(torch.from_numpy(qt.absmax)), bits(state.absmax)), backend
        got = halo.dequantize_4bit(qt, backend=backend)
        assert isinstance(got, torch.Tensor) and got.dtype == dtype and tuple(got.shape) == shape
        assert_matches_bnb_dequant(got, packed, state.absmax, quant_type, blocksize, shape, dtype)


def assert_matches_bnb_dequant(got, packed, absmax, quant_type, blocksize, shape, dtype):
    """halo equals bitsandbytes' reference (torch) dequantizer bit for bit, and its native
    CPU kernel wherever that kernel is self-consistent (see docs/quantization.md)."""
    code = F.get_4bit_type(quant_type, device="cpu")
    reference_values = _dequantize_4bit_compute.__wrapped__(
        packed.reshape(-1), absmax, code, blocksize, shape, dtype
    )
    assert np.array_equal(bits(got), bits(reference_values))
    native = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, blocksize, quant_type, list(shape), dtype)
    # bnb 0.50.2's native CPU kernel reads the wrong absmax for some shapes (e.g. [40, 96] with
    # blocksize 64, [7, 64] with 128) and its scalar path decodes FP4 code 8 as -0.0 where the rest
    # of bitsandbytes gives +0.0: where it agrees with its own reference, halo equals it too.
    if torch.equal(native, reference_values):
        assert np.array_equal(bits(got + 0.0), bits(native + 0.0))


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", [(257, 64), (1000, 513), (64 * 256 * 3 + 5,)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_double_quant_bit_exact(quant_type, blocksize, shape, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(7))
        packed, state = reference(w, quant_type, blocksize, nested=True)
        qt = halo.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=True)
    finally:
        torch.set_num_threads(old)
    assert np.array_equal(qt.packed, packed.numpy())
    assert qt.absmax.dtype == np.uint8
    assert np.array_equal(qt.absmax, state.absmax.numpy())
    assert np.array_equal(bits(torch.from_numpy(qt.nested_absmax)), bits(state.state2.absmax))
    assert np.float32(qt.nested_offset).view(np.int32) == np.float32(state.offset.item()).view(np.int32)
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert np.array_equal(bits(torch.from_numpy(qt.block_absmax())), bits(absmax))
    assert_matches_bnb_dequant(
        halo.dequantize_4bit(qt), packed, absmax, quant_type, blocksize, shape, torch.float32
    )


@needs_bnb
@pytest.mark.parametrize("blocksize, seed", [(32, 0), (64, 4)])
@pytest.mark.parametrize("threads", [2, 3])
def test_double_quant_offset_in_torch_thread_order_beyond_32768_blocks(blocksize, seed, threads):
    """Over 32,768 blocks torch's mean sums in a thread-dependent order; these inputs are
    ones where a one-thread sum gives a different offset, so ignoring the order fails here."""
    w = torch.randn(2_100_003, generator=torch.Generator().manual_seed(seed))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        packed, state = reference(w, "nf4", blocksize, nested=True)
        qt = halo.quantize_4bit(w, blocksize=blocksize, double_quant=True)
        plain = halo.quantize_4bit(w, blocksize=blocksize)
    finally:
        torch.set_num_threads(old)
    assert plain.absmax.size > 32768
    assert halo._core.quant.torch_mean_f32(plain.absmax, 1) != np.float32(state.offset.item())
    assert np.float32(qt.nested_offset).view(np.int32) == np.float32(state.offset.item()).view(np.int32)
    assert np.array_equal(qt.absmax, state.absmax.numpy())
    assert np.array_equal(qt.packed, packed.numpy())


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_matches_bitsandbytes(quant_type, nested, dtype):
    w = torch.randn(96, 40, generator=torch.Generator().manual_seed(3)).to(dtype)
    packed, state = reference(w, quant_type, 64, nested)
    ref = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    got = halo.quantize_4bit(w, quant_type=quant_type, double_quant=nested).to_bnb_state_dict("weight")
    assert list(got) == list(ref)  # the same keys in bitsandbytes' order
    for key, value in ref.items():
        assert got[key].dtype == value.dtype, key
        assert tuple(got[key].shape) == tuple(value.shape), key
        assert got[key].numpy().tobytes() == value.numpy().tobytes(), key


@needs_bnb
def test_state_dict_loads_into_linear4bit_and_back(tmp_path):
    from safetensors.torch import load_file, save_file

    lin = torch.nn.Linear(70, 30, bias=False)
    qt = halo.quantize_4bit(lin.weight.data, double_quant=True)
    sd = qt.to_bnb_state_dict("weight")
    save_file(sd, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    back = halo.QuantizedTensor.from_bnb_state_dict(loaded, "weight")
    assert np.array_equal(back.packed, qt.packed) and np.array_equal(back.absmax, qt.absmax)
    assert torch.equal(halo.dequantize_4bit(back), halo.dequantize_4bit(qt))
    # bitsandbytes reads halo's entries.
    bnb_layer = bnb.nn.Linear4bit(70, 30, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k[len("weight.") :]: v for k, v in loaded.items() if k != "weight"}
    bnb_layer.weight = bnb.nn.Params4bit.from_prequantized(
        data=loaded["weight"], quantized_stats=stats, requires_grad=False, device="cpu"
    )
    x = torch.randn(4, 70)
    expected = x @ halo.dequantize_4bit(qt).T
    assert torch.allclose(bnb_layer(x), expected, rtol=1e-5, atol=1e-5)
    # and halo reads what bitsandbytes' layer writes.
    again = halo.QuantizedTensor.from_bnb_state_dict(bnb_layer.state_dict(), "weight")
    assert np.array_equal(again.packed, qt.packed) and np.array_equal(again.absmax, qt.absmax)


def test_numpy_in_numpy_out_and_output_dtype():
    w = np.random.default_rng(0).standard_normal((16, 48)).astype(np.float16)
    qt = halo.quantize_4bit(w)
    out = halo.dequantize_4bit(qt)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16 and out.shape == (16, 48)
    as32 = halo.dequantize_4bit(qt, dtype="float32")
    assert as32.dtype == np.float32
    assert np.array_equal(as32.astype(np.float16), out)


def test_non_contiguous_input_matches_contiguous_copy():
    w = torch.randn(64, 96)
    qt_view = halo.quantize_4bit(w.t())
    qt_copy = halo.quantize_4bit(w.t().contiguous())
    assert np.array_equal(qt_view.packed, qt_copy.packed)


@needs_bnb
def test_all_zero_block_and_special_values_documented_behaviour():
    w = torch.zeros(128)
    w[64:] = torch.randn(64)
    packed, state = reference(w, "nf4", 64, False)
    qt = halo.quantize_4bit(w)
    assert np.array_equal(qt.packed, packed.numpy())
    assert qt.absmax[0] == 0.0 and (qt.packed[:32] == 0x77).all()
    special = torch.tensor([1.0, float("nan"), 2.0, float("inf")] * 16 + [0.5] * 64)
    packed, state = reference(special, "nf4", 64, False)
    qt = halo.quantize_4bit(special)
    assert np.array_equal(qt.packed, packed.numpy())
    assert np.array_equal(np.isnan(qt.absmax), np.isnan(state.absmax.numpy()))


def test_memory_layout_facts():
    qt = halo.quantize_4bit(np.arange(1, 6, dtype=np.float32), blocksize=32)
    assert qt.packed.shape == (3, 1)
    # 5/5 -> code 15 in the high nibble of byte 2, the pad is code 7 (zero) in the low nibble.
    assert qt.packed[2, 0] == 0xF7
    assert qt.nbytes == 3 + 4


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3000),
    blocksize=st.sampled_from(BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    nested=st.booleans(),
    scale=st.floats(1e-20, 1e20),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(n, blocksize, quant_type, nested, scale, seed):
    w = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    qt = halo.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=nested)
    back = halo.dequantize_4bit(qt)
    absmax = np.repeat(qt.block_absmax(), blocksize)[:n]
    # Half the widest gap between neighbouring codes (FP4: 1/3) plus the nested absmax error.
    tolerance = absmax * (0.1667 if quant_type == "fp4" else 0.1521) * (1.03 if nested else 1.0)
    assert np.all(np.abs(back - w) <= tolerance + np.abs(w) * (0.03 if nested else 0) + 1e-30)
    again = halo.QuantizedTensor.from_bnb_state_dict(qt.to_bnb_state_dict("p"), "p")
    assert np.array_equal(halo.dequantize_4bit(again), back)


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda: halo.quantize_4bit(np.ones(64, np.float32), blocksize=48), ValueError, "48"),
        (lambda: halo.quantize_4bit(np.ones(64, np.float32), quant_type="int4"), ValueError, "int4"),
        (lambda: halo.quantize_4bit(np.ones(64, np.int32)), TypeError, "int32"),
        (lambda: halo.quantize_4bit(torch.ones(64, dtype=torch.complex64)), TypeError, "complex64"),
        (lambda: halo.quantize_4bit(np.ones((0, 4), np.float32)), ValueError, "empty"),
        (lambda: halo.quantize_4bit([1.0, 2.0]), TypeError, "list"),
        (lambda: halo.quantize_4bit(np.ones(64, np.float32), backend="neon"), ValueError, "neon"),
        (lambda: halo.dequantize_4bit("nope"), TypeError, "str"),
    ],
)
def test_bad_input_raises_clear_errors(call, error, fragment):
    with pytest.raises(error, match=fragment) as info:
        call()
    assert "[" in str(info.value)


def test_device_tensors_are_refused_not_moved_to_the_cpu():
    """halo.quantize_4bit & co. run CPU kernels: a tensor on another device gets a clear error
    naming the function and the device (pointing to halo.ops), never a silent .cpu() copy.
    The meta device stands for any non-CPU device on a machine without a GPU (a silent
    .cpu() of a meta tensor fails with torch's own error, not this one)."""
    from halo import hwq, lora

    w = torch.ones(8, 64, device="meta")
    qt = halo.quantize_4bit(np.ones((8, 64), np.float32))
    a, b = np.ones((2, 64), np.float32), np.ones((8, 2), np.float32)
    calls = [
        ("quantize_4bit", lambda: halo.quantize_4bit(w)),
        ("matmul_4bit", lambda: halo.matmul_4bit(torch.ones(2, 64, device="meta"), qt)),
        ("matmul_4bit: bias", lambda: halo.matmul_4bit(torch.ones(2, 64), qt, torch.ones(8, device="meta"))),
        ("merge", lambda: lora.merge(w, a, b, 1.0)),
        ("merge", lambda: lora.merge(torch.ones(8, 64), torch.ones(2, 64, device="meta"), b, 1.0)),
        ("rtn_quantize", lambda: hwq.rtn_quantize(w)),
    ]
    for name, call in calls:
        with pytest.raises(ValueError, match=rf"^\[{name}\] .*on meta, not the CPU.*halo\.ops"):
            call()


def _state():
    return halo.quantize_4bit(
        np.random.default_rng(1).standard_normal(128).astype(np.float32)
    ).to_bnb_state_dict()


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda sd: sd.pop("weight.absmax"), "weight.absmax"),
        (lambda sd: sd.pop("weight.quant_state.bitsandbytes__nf4"), "quant_state"),
        (lambda sd: sd.__setitem__("weight", sd["weight"][:10]), "bytes"),
        (lambda sd: sd.__setitem__("weight.absmax", sd["weight.absmax"][:1]), "absmax"),
        (
            lambda sd: sd.__setitem__(
                "weight.quant_state.bitsandbytes__nf4",
                torch.frombuffer(bytearray(b"{not json"), dtype=torch.uint8),
            ),
            "JSON",
        ),
        (
            lambda sd: sd.__setitem__(
                "weight.quant_state.bitsandbytes__nf4",
                torch.frombuffer(
                    bytearray(
                        json.dumps(
                            {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [3, -1]}
                        ).encode()
                    ),
                    dtype=torch.uint8,
                ),
            ),
            "shape",
        ),
        (
            lambda sd: sd.__setitem__(
                "weight.quant_state.bitsandbytes__nf4",
                torch.frombuffer(
                    bytearray(
                        json.dumps(
                            {"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [128]}
                        ).encode()
                    ),
                    dtype=torch.uint8,
                ),
            ),
            "48",
        ),
    ],
)
def test_bad_state_dict_raises(mutate, fragment):
    sd = _state()
    mutate(sd)
    with pytest.raises(ValueError, match=fragment):
        halo.QuantizedTensor.from_bnb_state_dict(sd)


def test_torch_mean_matches_torch_for_thread_counts():
    values = torch.rand(100003) * 3
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            expected = values.mean().item()
            assert halo._core.quant.torch_mean_f32(values.numpy(), threads) == np.float32(expected)
    finally:
        torch.set_num_threads(old)


@needs_bnb
def test_dynamic_map_is_bitsandbytes():
    assert np.array_equal(halo._core.quant.dynamic_map(), F.create_dynamic_map(signed=True).numpy())
    for q in ("nf4", "fp4"):
        assert np.array_equal(halo._core.quant.code_book(q), F.get_4bit_type(q, device="cpu").numpy())


def test_dequantize_into_out_equals_fresh_result():
    w = torch.randn(40, 64)
    qt = halo.quantize_4bit(w)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = torch.empty(40, 64, dtype=dtype)
        name = str(dtype).replace("torch.", "")
        assert halo.dequantize_4bit(qt, out=out) is out
        assert torch.equal(out, halo.dequantize_4bit(qt, dtype=name))
    array = np.empty((40, 64), np.float32)
    halo.dequantize_4bit(halo.quantize_4bit(w.numpy()), out=array)
    assert np.array_equal(array, halo.dequantize_4bit(qt, dtype="float32").numpy())
    with pytest.raises(ValueError, match="elements"):
        halo.dequantize_4bit(qt, out=np.empty(10, np.float32))
    with pytest.raises(TypeError, match="float16"):
        halo.dequantize_4bit(qt, dtype="float32", out=np.empty(2560, np.float16))


def _nested_state_with(**changes):
    w = np.random.default_rng(2).standard_normal(64 * 300).astype(np.float32)
    sd = halo.quantize_4bit(w, double_quant=True).to_bnb_state_dict()
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].numpy()).decode())
    meta.update(changes)
    sd[key] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"nested_blocksize": 0}, "'nested_blocksize' must be a positive integer, got 0"),
        ({"nested_blocksize": "abc"}, "'nested_blocksize' must be a positive integer, got 'abc'"),
        ({"nested_blocksize": 10**30}, "'nested_blocksize' must be a positive integer, got 10000000000"),
        ({"nested_blocksize": 1.5}, "'nested_blocksize' must be a positive integer, got 1.5"),
        ({"nested_blocksize": True}, "'nested_blocksize' must be a positive integer, got True"),
        ({"nested_offset": None}, "'nested_offset' must be a finite float32 number, got None"),
        ({"nested_offset": 1e300}, "'nested_offset' must be a finite float32 number, got 1e\\+300"),
        ({"nested_offset": "0.5"}, "'nested_offset' must be a finite float32 number"),
        ({"nested_offset": 10**400}, "'nested_offset' must be a finite float32 number"),
    ],
)
def test_bad_nested_quant_state_raises_instead_of_nan_weights(changes, fragment):
    """Issue 9: each of these gave ZeroDivisionError, a bare int() error, a silently truncated
    block size or NaN/inf weights."""
    sd = _nested_state_with(**changes)
    with pytest.raises(ValueError, match=fragment) as info:
        halo.QuantizedTensor.from_bnb_state_dict(sd)
    assert str(info.value).startswith("[QuantizedTensor.from_bnb_state_dict]")


def test_good_nested_quant_state_still_reads():
    sd = _nested_state_with()
    qt = halo.QuantizedTensor.from_bnb_state_dict(sd)
    assert np.isfinite(halo.dequantize_4bit(qt)).all()


# -- the typed boundary ------------------------------------------------------------------------------


def test_big_endian_input_gives_the_native_result():
    w = np.random.default_rng(5).standard_normal((33, 64)).astype(np.float32)
    native = halo.quantize_4bit(w)
    swapped = halo.quantize_4bit(w.astype(">f4"))
    assert np.array_equal(swapped.packed, native.packed) and np.array_equal(swapped.absmax, native.absmax)
    assert np.array_equal(halo.dequantize_4bit(swapped), halo.dequantize_4bit(native))
    with pytest.raises(TypeError, match="big-endian"):
        halo.dequantize_4bit(native, out=np.empty((33, 64), ">f4"))


def test_core_refuses_buffers_of_the_wrong_element_type():
    core = halo._core.quant
    halves = np.ones(64, np.float16)
    with pytest.raises(TypeError, match="bfloat16.*format 'e'"):
        core.quantize_4bit(halves, "bfloat16", "nf4", 64, "auto")
    with pytest.raises(TypeError, match="float16"):
        core.quantize_4bit(halves.view(np.uint16), "float16", "nf4", 64, "auto")
    with pytest.raises(TypeError, match="big-endian"):
        core.quantize_4bit(np.ones(64, ">f4"), "float32", "nf4", 64, "auto")
    packed, absmax = core.quantize_4bit(np.ones(64, np.float32), "float32", "nf4", 64, "auto")
    with pytest.raises(TypeError, match="absmax must hold float32"):
        core.dequantize_4bit(packed, absmax.view(np.int32), 64, "nf4", 64, "float32", "auto")
    with pytest.raises(TypeError, match="packed must hold uint8"):
        core.dequantize_4bit(packed.view(np.int8), absmax, 64, "nf4", 64, "float32", "auto")


def test_dtype_objects_are_accepted_and_bad_outs_refused():
    w = np.random.default_rng(6).standard_normal((8, 64)).astype(np.float32)
    qt = halo.quantize_4bit(w)
    expected = halo.dequantize_4bit(qt, dtype="float16")
    for spelling in (np.float16, np.dtype("float16"), torch.float16, "float16"):
        got = halo.dequantize_4bit(qt, dtype=spelling)
        assert got.dtype == np.float16 and np.array_equal(got, expected), spelling
    with pytest.raises(
        TypeError, match=r"\[dequantize_4bit\] out must be a NumPy array or a torch tensor, got list"
    ):
        halo.dequantize_4bit(qt, out=[0.0] * 512)
    with pytest.raises(TypeError, match="int8"):
        halo.dequantize_4bit(qt, dtype=np.int8)
    with pytest.raises(TypeError, match="dense"):
        halo.quantize_4bit(torch.eye(64).to_sparse())


def test_numpy_only_tests_run_without_bitsandbytes(tmp_path):
    """With bitsandbytes unimportable, the tests that do not compare against it still run."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n")
    import os

    paths = [str(tmp_path)] + [
        os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    here = Path(__file__)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(here),
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "numpy_in_numpy_out or memory_layout or round_trip_property or bad_input or typed or big_endian"
            " or wrong_element or dtype_objects",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=here.parents[2],
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-1000:]
