"""halo.nn.Linear4bit and the torch.ops.halo operators: bitsandbytes' state dict both
ways, forward/backward against float references from the dequantized weight, fake
(meta) kernels and torch.compile, clear errors, and CUDA tensors staying on the GPU."""

from __future__ import annotations

import halo
import halo.nn as hnn
import pytest
import torch
from halo import _core, formats, ops

bnb = pytest.importorskip("bitsandbytes")

SHAPES = [(33, 70), (64, 64), (7, 129)]


def bnb_layer(linear: torch.nn.Linear, quant_type: str, double_quant: bool):
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes on the move


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_matches_bitsandbytes_byte_for_byte(shape, quant_type, double_quant):
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0], bias=shape[0] % 2 == 1)
    ours = hnn.Linear4bit.from_linear(linear, quant_type=quant_type, double_quant=double_quant).state_dict()
    theirs = bnb_layer(linear, quant_type, double_quant).state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_checkpoint_loads_into_halo_and_back(quant_type):
    torch.manual_seed(1)
    linear = torch.nn.Linear(70, 33)
    theirs = bnb_layer(linear, quant_type, True)
    state = theirs.state_dict()
    ours = hnn.Linear4bit(70, 33, quant_type="nf4")  # settings come from the checkpoint
    ours.load_state_dict(state)
    assert ours.quant_type == quant_type
    x = torch.randn(4, 70)
    w = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    torch.testing.assert_close(ours.dequantize(torch.float32), w, rtol=0, atol=0)
    torch.testing.assert_close(ours(x), x @ w.t() + linear.bias, rtol=1e-5, atol=1e-5)
    # halo -> bitsandbytes: the prequantized path transformers uses
    back = ours.state_dict()
    stats = {k.removeprefix("weight."): v for k, v in back.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(data=back["weight"], quantized_stats=stats, device="cpu")
    torch.testing.assert_close(
        bnb.functional.dequantize_4bit(param.data, param.quant_state), w, rtol=0, atol=0
    )


def test_float_state_dict_quantizes_on_load_and_strict_keys_are_checked():
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 32)
    layer = hnn.Linear4bit(64, 32)
    layer.load_state_dict(linear.state_dict())
    assert layer.is_quantized and layer.weight.dtype == torch.uint8
    state = layer.state_dict()
    state["weight.unexpected"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="weight.unexpected"):
        hnn.Linear4bit(64, 32).load_state_dict(state)


def test_forward_equals_float_linear_on_the_dequantized_weight():
    torch.manual_seed(3)
    linear = torch.nn.Linear(70, 33)
    layer = hnn.Linear4bit.from_linear(linear)
    w = layer.dequantize(torch.float32)
    x = torch.randn(2, 5, 70)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, linear.bias), rtol=1e-5, atol=1e-5)
    bf16 = hnn.Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    y = bf16(x)
    assert y.dtype == torch.float32  # back in the input's dtype, as bitsandbytes
    ref = torch.nn.functional.linear(x.bfloat16(), w.bfloat16(), linear.bias.bfloat16()).float()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_leave_every_tensor_storage_resizable(dtype):
    """FSDP2 frees a gathered parameter by resizing its storage to 0 after the forward; a kernel
    that crossed to C++ through Tensor.numpy() pins the storage and that fails."""
    torch.manual_seed(4)
    layer = hnn.Linear4bit.from_linear(torch.nn.Linear(64, 48)).to(dtype)
    # Storage that torch allocated, as FSDP's gathered parameters are (from_numpy's is never resizable).
    layer.weight.data = layer.weight.data.clone()
    layer.weight_absmax = layer.weight_absmax.clone()
    layer.weight_nested_absmax = layer.weight_nested_absmax.clone()
    x = torch.randn(3, 64, dtype=dtype, requires_grad=True)
    tensors = {"packed weight": layer.weight, "absmax": layer.weight_absmax, "x": x}
    tensors["nested absmax"] = layer.weight_nested_absmax
    assert all(t.untyped_storage().resizable() for t in tensors.values())
    layer(x).sum().backward()
    tensors["grad"] = x.grad
    for name, tensor in tensors.items():
        assert tensor.untyped_storage().resizable(), f"{name} storage was pinned by the CPU kernel"


# bfloat16 keeps 8 significant bits (unit roundoff 2**-9 ~ 0.2%) and the output, x's gradient
# and the 4-bit matmuls are rounded to it a few times on the way: measured errors are at most
# 0.35% of the largest value, so bfloat16 is held to 1% (float32 to 1e-4), rtol and atol alike.
@pytest.mark.parametrize("x_dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_lora_linear_gradients_match_a_float64_reference(x_dtype, tol):
    torch.manual_seed(4)
    out_f, in_f, r, scaling = 33, 70, 5, 1.7

    def representable(t: torch.Tensor) -> torch.Tensor:
        """Values x's dtype holds exactly, so the reference sees the inputs halo sees."""
        return t.to(x_dtype).double()

    layer = hnn.Linear4bit.from_linear(torch.nn.Linear(in_f, out_f))
    w64 = layer.dequantize(torch.float32).double()
    bias = representable(torch.randn(out_f)).requires_grad_()
    a = torch.randn(r, in_f, dtype=torch.float64, requires_grad=True)  # the adapter stays float32
    b = torch.randn(out_f, r, dtype=torch.float64, requires_grad=True)
    x = representable(torch.randn(3, 4, in_f)).requires_grad_()
    keep = (torch.rand(3, 4, in_f) > 0.3).double() / 0.7  # a fixed dropout mask on the adapter input
    grad_out = representable(torch.randn(3, 4, out_f))

    def reference():
        return x @ w64.t() + bias + scaling * ((x * keep) @ a.t()) @ b.t()

    def ours():
        packed, absmax, nested, offset, quant_type, blocksize = layer.weight_args()
        return torch.ops.halo.lora_linear(
            x.to(x_dtype),
            (x * keep).to(x_dtype),
            packed,
            absmax,
            nested,
            offset,
            out_f,
            quant_type,
            blocksize,
            bias.float(),
            a.float(),
            b.float(),
            scaling,
        )

    grads = []
    for fn in (reference, ours):
        for t in (x, a, b, bias):
            t.grad = None
        y = fn()
        y.backward(grad_out.to(y.dtype))
        grads.append([y.detach().double()] + [t.grad.clone() for t in (x, a, b, bias)])
    assert y.dtype == x_dtype  # the layer answers in x's dtype
    for name, ref, got in zip(["y", "x", "A", "B", "bias"], *grads):
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item(), msg=name)


def test_ops_pass_torch_library_opcheck_and_meta():
    torch.manual_seed(5)
    layer = hnn.Linear4bit.from_linear(torch.nn.Linear(64, 48))
    packed, absmax, nested, offset, quant_type, blocksize = layer.weight_args()
    x = torch.randn(3, 64, requires_grad=True)
    bias = torch.randn(48, requires_grad=True)
    a = torch.randn(4, 64, requires_grad=True)
    b = torch.randn(48, 4, requires_grad=True)
    torch.library.opcheck(
        torch.ops.halo.matmul_4bit.default,
        (x, packed, absmax, nested, offset, 48, quant_type, blocksize, bias),
    )
    torch.library.opcheck(
        torch.ops.halo.lora_linear.default,
        (
            x,
            x.detach().clone().requires_grad_(),
            packed,
            absmax,
            nested,
            offset,
            48,
            quant_type,
            blocksize,
            bias,
            a,
            b,
            2.0,
        ),
    )
    torch.library.opcheck(torch.ops.halo.quantize_4bit.default, (torch.randn(10, 7), "fp4", 32))
    torch.library.opcheck(
        torch.ops.halo.dequantize_4bit.default,
        (packed, absmax, nested, offset, [48, 64], quant_type, blocksize, torch.bfloat16),
    )
    meta = torch.ops.halo.matmul_4bit(
        x.to("meta"),
        packed.to("meta"),
        absmax.to("meta"),
        nested.to("meta"),
        offset,
        48,
        quant_type,
        blocksize,
        None,
    )
    assert meta.device.type == "meta" and meta.shape == (3, 48)


def test_linear4bit_under_torch_compile_matches_eager():
    torch.manual_seed(6)
    layer = hnn.Linear4bit.from_linear(torch.nn.Linear(64, 32))
    x = torch.randn(5, 64, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x.grad, grad)


def test_torch_op_quantize_equals_halo_quantize_4bit():
    torch.manual_seed(7)
    w = torch.randn(33, 70, dtype=torch.bfloat16)
    packed, absmax = ops.quantize_4bit(w, "nf4", 64)
    qt = halo.quantize_4bit(w, "nf4", 64)
    assert torch.equal(packed, torch.from_numpy(qt.packed)) and torch.equal(
        absmax, torch.from_numpy(qt.absmax)
    )
    back = ops.dequantize_4bit(packed, absmax, (33, 70), "nf4", 64, torch.bfloat16)
    assert back.dtype == torch.bfloat16 and torch.equal(back, halo.dequantize_4bit(qt))


def test_bad_arguments_give_clear_errors():
    layer = hnn.Linear4bit.from_linear(torch.nn.Linear(64, 32))
    packed, absmax, nested, offset, quant_type, blocksize = layer.weight_args()
    with pytest.raises(ValueError, match=r"\[Linear4bit\] quant_type must be 'nf4' or 'fp4', got 'int4'"):
        hnn.Linear4bit(8, 8, quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        hnn.Linear4bit(8, 8, blocksize=48)
    with pytest.raises(TypeError, match="compute_dtype"):
        hnn.Linear4bit(8, 8, compute_dtype=torch.int8)
    with pytest.raises(TypeError, match=r"Linear4bit.forward\] x must be a float tensor"):
        layer(torch.ones(2, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 64\]"):
        layer(torch.randn(2, 63))
    with pytest.raises(RuntimeError, match="not quantized yet"):
        hnn.Linear4bit(8, 8)(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"halo::matmul_4bit\] absmax holds"):
        torch.ops.halo.matmul_4bit(
            torch.randn(2, 64), packed, absmax[:-1], nested, offset, 32, quant_type, blocksize, None
        )
    with pytest.raises(
        ValueError, match=r"\[halo::quantize_4bit\] quant_type must be 'nf4' or 'fp4', got 'nf3'"
    ):
        ops.quantize_4bit(torch.randn(8, 8), "nf3")
    with pytest.raises(TypeError, match=r"hnn|expected an nn.Linear"):
        hnn.Linear4bit.from_linear(torch.nn.Conv1d(3, 3, 1))


def test_settings_follow_the_format_table():
    # Linear4bit takes exactly the 4-bit types and block sizes halo.formats lists.
    for quant_type in formats.BNB4_TYPES:
        for blocksize in formats.BNB4_BLOCKSIZES:
            layer = hnn.Linear4bit(8, 8, quant_type=quant_type, blocksize=blocksize)
            assert (layer.quant_type, layer.blocksize) == (quant_type, blocksize)
    low, high = formats.BNB4_BLOCKSIZES[0], formats.BNB4_BLOCKSIZES[-1]
    for bad in (low // 2, high * 2, low + 1):
        with pytest.raises(
            ValueError, match=rf"blocksize must be a power of two in {low}\.\.{high}, got {bad}$"
        ):
            hnn.Linear4bit(8, 8, blocksize=bad)


def test_cuda_tensors_never_take_a_silent_trip_to_the_cpu():
    if torch.cuda.is_available() and _core.cuda.compiled():
        w = torch.randn(33, 70, device="cuda")
        packed, absmax = ops.quantize_4bit(w, "nf4", 64)
        assert packed.device.type == "cuda" and absmax.device.type == "cuda"
        ref_packed, ref_absmax = ops.quantize_4bit(w.cpu(), "nf4", 64)
        assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax)
        y = ops.matmul_4bit(torch.randn(4, 70, device="cuda"), packed, absmax, 33)
        assert y.device.type == "cuda"
        return
    if "cuda" in halo.backends():
        pytest.skip("a CUDA device works but this torch has no CUDA: no device tensors to test with")
    # No usable GPU: the device-pointer entry points exist and refuse clearly instead of copying,
    # whether halo was built without nvcc or with it (then the CUDA runtime's own reason is named).
    reason = "built without CUDA" if not _core.cuda.compiled() else ""
    expected = r"\[dequantize_4bit_device\] backend 'cuda' is not available: .*" + reason
    with pytest.raises(RuntimeError, match=expected):
        _core.cuda.dequantize_4bit(0, 0, 64, "nf4", 64, 0, "float32", 0)
    pytest.skip("no CUDA device (or halo built without CUDA): the GPU path was checked only for its refusal")


def test_load_state_dict_refuses_a_packed_weight_that_is_not_uint8():
    # A bitsandbytes state dict whose packed weight is int8 (or any dtype but uint8) used to be
    # read as raw bytes; it must be refused at load, naming the key and the dtype.
    layer = hnn.Linear4bit.from_linear(torch.nn.Linear(64, 32))
    state = layer.state_dict()
    for dtype in (torch.int8, torch.int16):
        bad = dict(state, weight=state["weight"].to(dtype))
        target = hnn.Linear4bit(64, 32)
        with pytest.raises(RuntimeError, match=rf"\] weight: .*must be torch.uint8 .*, got {dtype}"):
            target.load_state_dict(bad)
        assert not target.is_quantized
    # A float dtype is a quant_storage only with the bytes' count of values: the uint8 bytes cast
    # numerically to float16 (one value per byte) are refused, naming the count expected.
    bad = dict(state, weight=state["weight"].to(torch.float16))
    target = hnn.Linear4bit(64, 32)
    with pytest.raises(RuntimeError, match=r"\] weight: .*torch.float16 must hold 512 values .* got 1024"):
        target.load_state_dict(bad)
    assert not target.is_quantized
    # nn.Linear's keys with an integer weight (no quant_state): not a float checkpoint either.
    target = hnn.Linear4bit(64, 32)
    with pytest.raises(
        RuntimeError, match=r"\] weight: a torch.int8 weight without bitsandbytes' quant_state"
    ):
        target.load_state_dict({"weight": torch.zeros(32, 64, dtype=torch.int8), "bias": torch.zeros(32)})
    assert not target.is_quantized
    # The uint8 original still loads, bit for bit.
    good = hnn.Linear4bit(64, 32)
    good.load_state_dict(state)
    assert torch.equal(good.weight, layer.weight)


def test_lora_op_with_fan_in_fan_out_on_every_backend():
    # W stored [in, out] (GPT-2's Conv1D): the op computes x W + bias + s (x A^T) B^T and its
    # gradients on each CPU kernel backend, against torch autograd on the dequantized weight.
    torch.manual_seed(8)
    stored = torch.randn(64, 48)
    packed, absmax = ops.quantize_4bit(stored, "nf4", 64)
    w = ops.dequantize_4bit(packed, absmax, [64, 48], "nf4", 64)
    x, bias = torch.randn(3, 5, 64), torch.randn(48)
    a, b = torch.randn(4, 64), torch.randn(48, 4)
    grad_y = torch.randn(3, 5, 48)
    leaves = [t.clone().requires_grad_(True) for t in (x, bias, a, b)]
    ref = leaves[0] @ w + leaves[1] + (leaves[0] @ leaves[2].T @ leaves[3].T) * 0.5
    ref.backward(grad_y)
    for backend in halo.backends():
        ours = [t.clone().requires_grad_(True) for t in (x, bias, a, b)]
        y = ops.lora_linear(
            ours[0],
            packed,
            absmax,
            48,
            ours[2],
            ours[3],
            0.5,
            "nf4",
            64,
            ours[1],
            fan_in_fan_out=True,
            backend=backend,
        )
        y.backward(grad_y)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4, msg=backend)
        for got, want in zip(ours, leaves):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-4, msg=backend)
    args = (x.requires_grad_(), x.clone().requires_grad_(), packed, absmax, None, 0.0, 48, "nf4", 64, bias)
    torch.library.opcheck(torch.ops.halo.lora_linear.default, (*args, a, b, 0.5, True, "auto"))
    with pytest.raises(ValueError, match=r"\[halo::lora_linear\] .*backend"):
        ops.lora_linear(x, packed, absmax, 48, a, b, 0.5, fan_in_fan_out=True, backend="sse9")


def test_double_quantize_op_equals_the_numpy_api_and_passes_opcheck():
    # Linear4bit's nested statistics come from torch.ops.halo.double_quantize_absmax: the same
    # codes, blocks and offset as halo.quantize_4bit(double_quant=True) (checked against
    # bitsandbytes elsewhere).
    torch.manual_seed(9)
    w = torch.randn(70, 300)
    qt = halo.quantize_4bit(w, "nf4", 64, double_quant=True)
    _, absmax = ops.quantize_4bit(w, "nf4", 64)
    codes, nested, offset = torch.ops.halo.double_quantize_absmax(absmax, torch.get_num_threads())
    assert torch.equal(codes, torch.from_numpy(qt.absmax))
    assert torch.equal(nested, torch.from_numpy(qt.nested_absmax))
    assert float(offset) == qt.nested_offset
    torch.library.opcheck(torch.ops.halo.double_quantize_absmax.default, (absmax, 2))
    with pytest.raises(
        ValueError, match=r"\[halo::double_quantize_absmax\] absmax must be .* got torch.float16"
    ):
        torch.ops.halo.double_quantize_absmax(absmax.half(), 1)


def test_decoded_scales_follow_every_change_of_the_statistics():
    """The CPU kernels decode a double-quantized weight's scales once and keep them; an in-place
    change of the codes or of the nested statistics, or a new tensor, must be decoded afresh:
    the matmul then equals the float product with the weight dequantized from the new statistics
    (halo's own NumPy dequantization, not the cached path)."""
    torch.manual_seed(3)
    layer = hnn.Linear4bit.from_linear(torch.nn.Linear(128, 64, bias=False), "nf4", None, True, 64)
    x = torch.randn(5, 128)

    def expected():
        scales = _core.quant.double_dequantize(
            layer.weight_absmax.numpy(), layer.weight_nested_absmax.numpy(), float(layer.nested_offset), 256
        )
        w = _core.quant.dequantize_4bit(
            layer.weight.numpy().reshape(-1), scales.astype("float32"), 128 * 64, "nf4", 64, "float32", "auto"
        )
        return x @ torch.from_numpy(w.reshape(64, 128)).t()

    torch.testing.assert_close(layer(x), expected())
    layer(x)  # a second call takes the cached scales
    with torch.no_grad():
        layer.weight_absmax.add_(3)  # codes changed in place
    torch.testing.assert_close(layer(x), expected())
    with torch.no_grad():
        layer.weight_nested_absmax.mul_(1.5)  # nested statistics changed in place
    torch.testing.assert_close(layer(x), expected())
    layer.weight_nested_absmax = layer.weight_nested_absmax * 0.5  # a new tensor
    torch.testing.assert_close(layer(x), expected())


def test_lora_linear_hands_back_the_callers_dtype_without_a_round_trip():
    """out_dtype=float32 with bf16 compute: the bf16 base product plus the float32 adapter delta,
    added and returned in float32 (as PEFT adds the delta to the base's float32 output), not
    rounded to bf16 on the way; the fake kernel and autograd agree (opcheck)."""
    torch.manual_seed(6)
    layer = hnn.Linear4bit.from_linear(torch.nn.Linear(128, 96, bias=False))
    packed, absmax, nested, offset, quant_type, blocksize = layer.weight_args()
    x = torch.randn(7, 128)
    a, b = torch.randn(8, 128) * 0.1, torch.randn(96, 8) * 0.1
    xc = x.bfloat16()
    args = (xc, x, packed, absmax, nested, offset, 96, quant_type, blocksize, None, a, b, 2.0)
    y = torch.ops.halo.lora_linear(*args, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    base = torch.ops.halo.matmul_4bit(xc, packed, absmax, nested, offset, 96, quant_type, blocksize, None)
    want = base.float() + (x.double() @ a.double().t() @ b.double().t() * 2.0).float()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert torch.ops.halo.lora_linear(*args).dtype == torch.bfloat16  # the default stays x's dtype
    grads = [t.requires_grad_() for t in (xc.clone(), x.clone(), a.clone(), b.clone())]
    torch.library.opcheck(
        torch.ops.halo.lora_linear.default,
        (
            grads[0],
            grads[1],
            packed,
            absmax,
            nested,
            offset,
            96,
            quant_type,
            blocksize,
            None,
            grads[2],
            grads[3],
            2.0,
        ),
        {"out_dtype": torch.float32},
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_weight_views_follow_every_change_of_the_codes_and_scales(dtype):
    """The CPU kernels keep a view of a weight's codes and float32 scales between calls (keyed by
    storage address and version); in-place changes, new tensors and a storage freed and
    re-filled as FSDP2 does must all be read afresh, and a freed storage is refused, not read."""
    torch.manual_seed(5)
    w = torch.randn(48, 64)
    packed, absmax = ops.quantize_4bit(w)
    packed, absmax = packed.clone(), absmax.clone()  # storage torch allocated (resizable)
    x = torch.randn(7, 64, dtype=dtype)

    def run():
        return ops.matmul_4bit(x, packed, absmax, 48)

    def expected():
        dense = ops.dequantize_4bit(packed.clone(), absmax.clone(), [48, 64], dtype=dtype)  # W in x's dtype
        return (x.float() @ dense.float().t()).to(dtype)

    # bfloat16: the sums' order differs and the result is rounded (about 2**-9 of the largest value)
    tol = {"rtol": 1e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(run(), expected(), **tol)
    run()  # the kept views
    with torch.no_grad():
        absmax.mul_(2.0)
    torch.testing.assert_close(run(), expected(), **tol)
    other, _ = ops.quantize_4bit(torch.randn(48, 64))
    with torch.no_grad():
        packed.copy_(other)
    torch.testing.assert_close(run(), expected(), **tol)
    keep = packed.clone()
    packed.untyped_storage().resize_(0)  # FSDP2 frees the gathered parameter after the forward
    with pytest.raises(ValueError, match="storage was freed"):
        run()
    packed.untyped_storage().resize_(keep.numel())
    with torch.no_grad():
        packed.copy_(keep)  # and gathers it again before the next one
    torch.testing.assert_close(run(), expected(), **tol)


def test_bf16_products_of_many_rows_through_torch_gemm_agree_with_the_fused_kernels(monkeypatch):
    """From DENSE_ROWS rows of bfloat16 x on an AMX CPU (DENSE_ROWS_AVX512_BF16 on one with
    AVX512-BF16 only), W is decoded and multiplied by torch's GEMM; forward (with and without bias)
    and input gradient must agree with halo's fused kernels, and a CPU pinned to avx2
    (HALO_BACKEND=avx2) must keep the fused kernels."""
    from halo.backends.cpu import ops as cpu

    if cpu._dense_from() is None:
        pytest.skip("this CPU computes no bfloat16 natively")
    torch.manual_seed(6)
    packed, absmax = ops.quantize_4bit(torch.randn(96, 128))
    x, g = torch.randn(40, 128).bfloat16(), torch.randn(40, 96).bfloat16()
    bias = torch.randn(96).bfloat16()
    taken = []
    dense, dense_from = cpu._dense, cpu._dense_from
    monkeypatch.setattr(cpu, "_dense", lambda *a: taken.append(a[-1]) or dense(*a))

    def products():
        return (
            ops.matmul_4bit(x, packed, absmax, 96),
            ops.matmul_4bit(x, packed, absmax, 96, bias=bias),
            torch.ops.halo.matmul_4bit_grad(g, packed, absmax, None, 0.0, 128, "nf4", 64),
        )

    monkeypatch.setattr(cpu, "_dense_from", lambda: 10**9)
    fused = products()
    assert taken == []
    monkeypatch.setattr(cpu, "_dense_from", lambda: 40)
    through_gemm = products()
    assert taken == [False, False, True]
    for a, b in zip(fused, through_gemm):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=2e-2 * float(a.float().abs().max()))
    monkeypatch.setattr(cpu, "_dense_from", dense_from)
    monkeypatch.setenv("HALO_BACKEND", "avx2")
    products()
    assert taken == [False, False, True]  # no new dense calls


def test_the_dense_path_starts_where_the_cpu_computes_bfloat16_natively(monkeypatch):
    """AMX: from DENSE_ROWS rows; AVX512-BF16 without AMX (or AMX switched off): from
    DENSE_ROWS_AVX512_BF16; no native bfloat16 (avx2 pinned, or AVX512-BF16 switched off too): never."""
    from halo.backend import native_bf16_features
    from halo.backends.cpu import ops as cpu

    features = native_bf16_features()
    expected = (
        cpu.DENSE_ROWS
        if "amx_bf16" in features
        else cpu.DENSE_ROWS_AVX512_BF16
        if "avx512_bf16" in features
        else None
    )
    assert cpu._dense_from() == expected
    monkeypatch.setenv("HALO_DISABLE_AMX", "1")
    assert cpu._dense_from() == (cpu.DENSE_ROWS_AVX512_BF16 if "avx512_bf16" in features else None)
    monkeypatch.setenv("HALO_DISABLE_AVX512_BF16", "1")
    assert cpu._dense_from() is None
    monkeypatch.delenv("HALO_DISABLE_AMX")
    monkeypatch.delenv("HALO_DISABLE_AVX512_BF16")
    monkeypatch.setenv("HALO_BACKEND", "avx2")
    assert cpu._dense_from() is None
