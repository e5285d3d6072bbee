"""``quant_storage``: halo's packed 4-bit weights stored as a float dtype (bitsandbytes'
``bnb_4bit_quant_storage``) so that FSDP1 can flatten them with a unit's float parameters.

The bytes must be those of the uint8 layout, the layer must compute exactly what the uint8
layer computes, checkpoints must move both ways (with bitsandbytes too), and nothing that casts
a model's float parameters (``.to(dtype)``, PEFT's ``prepare_model_for_kbit_training``) may
touch them numerically.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import halo.nn as hnn  # noqa: E402
import tiny_models  # noqa: E402
from halo.hf import HaloConfig, quantize_model, register_lora  # noqa: E402

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8).reshape(-1)


@pytest.mark.parametrize("storage", FLOATS)
@pytest.mark.parametrize("shape", [(32, 70), (7, 129)])  # 1120 bytes; 452 bytes (padded for fp32)
def test_layer_stores_the_uint8_bytes_as_a_float_and_computes_the_same(storage, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0])
    plain = hnn.Linear4bit.from_linear(linear)
    stored = hnn.Linear4bit.from_linear(linear, quant_storage=storage)
    nbytes = (shape[0] * shape[1] + 1) // 2
    itemsize = torch.empty((), dtype=storage).element_size()
    assert stored.weight.dtype == storage and not stored.weight.requires_grad
    assert tuple(stored.weight.shape) == (-(-nbytes // itemsize), 1)
    assert torch.equal(_bytes(stored.weight)[:nbytes], _bytes(plain.weight))
    assert torch.equal(stored.packed, plain.weight)
    x = torch.randn(5, shape[1], requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = plain(x), stored(x2)
    assert torch.equal(y, y2)
    y.square().sum().backward()
    y2.square().sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(stored.dequantize(), plain.dequantize())


def test_quant_storage_is_checked():
    with pytest.raises(TypeError, match=r"\[Linear4bit\] quant_storage must be one of .*got torch.int8"):
        hnn.Linear4bit(8, 8, quant_storage=torch.int8)
    with pytest.raises(TypeError, match=r"\[HaloConfig\] quant_storage must be one of .*got 'float8'"):
        HaloConfig(quant_storage="float8")
    assert HaloConfig(quant_storage="bfloat16").quant_storage == torch.bfloat16
    assert HaloConfig(quant_storage="torch.float32").to_dict()["quant_storage"] == "float32"
    assert HaloConfig().to_dict()["quant_storage"] == "uint8"
    bnb = {"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16", "bnb_4bit_quant_type": "nf4"}
    assert HaloConfig.from_bnb(bnb).quant_storage == torch.bfloat16


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_state_dict_round_trips_with_bitsandbytes_quant_storage(storage):
    """bitsandbytes' Linear4bit(quant_storage=...) state dict loads into halo and computes what
    bitsandbytes computes; halo's state dict has bitsandbytes' dtype, shape and bytes."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(1)
    linear = torch.nn.Linear(70, 32)
    theirs = bnb.nn.Linear4bit(70, 32, quant_type="nf4", compress_statistics=True, quant_storage=storage)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")
    state = theirs.state_dict()
    ours = hnn.Linear4bit.from_linear(linear, quant_storage=storage)
    mine = ours.state_dict()
    assert mine["weight"].dtype == state["weight"].dtype == storage
    assert mine["weight"].shape == state["weight"].shape
    assert torch.equal(_bytes(mine["weight"]), _bytes(state["weight"]))
    x = torch.randn(4, 70)
    for target_storage in (torch.uint8, storage):  # into either storage
        loaded = hnn.Linear4bit(70, 32, quant_storage=target_storage)
        loaded.load_state_dict(state)
        assert loaded.weight.dtype == target_storage
        assert torch.equal(loaded(x), theirs(x).detach())


def test_dtype_casts_and_peft_preparation_leave_the_bytes_alone():
    model = quantize_model(
        tiny_models.llama(seed=0), compute_dtype=torch.float32, quant_storage=torch.bfloat16
    )
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.packed.clone()
    x = torch.randn(2, 64)
    expected = layer(x)
    # transformers refuses .half() on a quantized model; torch's own casts reach the layer anyway.
    layer.float().half().to(torch.float32)
    torch.nn.Module.to(model, torch.float16)
    assert model.model.norm.weight.dtype == torch.float16  # the cast did reach the float parameters
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.packed, before)
    model.is_loaded_in_4bit = True
    peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model.model.norm.weight.dtype == torch.float32  # PEFT did cast the others back
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.packed, before)
    assert torch.equal(layer(x), expected)


def _lora_model(storage):
    model = quantize_model(tiny_models.llama(seed=0), compute_dtype=torch.float32, quant_storage=storage)
    torch.manual_seed(1)
    config = register_lora(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=tiny_models.LLAMA_TARGETS, init_lora_weights=False)
    )
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_qlora_forward_and_backward_equal_the_uint8_storage(storage):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    runs = []
    for s in (torch.uint8, storage):
        model = _lora_model(s)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((loss.detach(), grads))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1].keys() == runs[1][1].keys() and runs[0][1]
    for name, grad in runs[0][1].items():
        assert torch.equal(grad, runs[1][1][name]), name


def test_from_pretrained_with_quant_storage_saves_and_loads_back(tmp_path):
    import transformers

    base = tiny_models.save_base(tiny_models.llama(seed=0), tmp_path / "base")
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(4))
    models = {}
    for storage in (torch.uint8, torch.bfloat16):
        config = HaloConfig(compute_dtype=torch.float32, quant_storage=storage)
        models[storage] = transformers.AutoModelForCausalLM.from_pretrained(
            base, quantization_config=config, dtype=torch.float32
        )
    layer = models[torch.bfloat16].model.layers[1].mlp.down_proj
    assert isinstance(layer, hnn.Linear4bit) and layer.weight.dtype == torch.bfloat16
    expected = models[torch.uint8](ids).logits
    assert torch.equal(models[torch.bfloat16](ids).logits, expected)
    models[torch.bfloat16].save_pretrained(tmp_path / "saved")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert again.config.quantization_config.quant_storage == torch.bfloat16
    assert again.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    assert torch.equal(again(ids).logits, expected)


def test_check_fsdp1_names_the_layer_and_the_dtypes():
    from halo.hf.distributed import check_fsdp1, check_ranks, quant_storages

    good = quantize_model(tiny_models.llama(seed=0), compute_dtype=torch.float32, quant_storage=torch.float32)
    check_fsdp1(good)
    check_ranks(good)  # no process group: nothing to compare
    assert set(quant_storages(good).values()) == {torch.float32} and len(quant_storages(good)) == 14
    plain = quantize_model(tiny_models.llama(seed=0), compute_dtype=torch.float32)
    with pytest.raises(
        ValueError, match=r"\[check_fsdp1\] .* 4-bit layer 'model.layers.0.self_attn.q_proj' and 13"
    ):
        check_fsdp1(plain)
    # One layer stored differently from the others (e.g. replaced after loading).
    mixed = quantize_model(
        tiny_models.llama(seed=0), compute_dtype=torch.float32, quant_storage=torch.float32
    )
    linear = torch.nn.Linear(128, 64, bias=False)
    mixed.model.layers[1].mlp.down_proj = hnn.Linear4bit.from_linear(linear, quant_storage=torch.bfloat16)
    with pytest.raises(
        ValueError,
        match=r"\[check_fsdp1\] the 4-bit layers store their packed weights in different "
        r"quant_storage dtypes "
        r"\('model.layers.0.self_attn.q_proj' float32, 'model.layers.1.mlp.down_proj' bfloat16\)",
    ):
        check_fsdp1(mixed)
    # bfloat16 bytes beside float32 parameters: FSDP1 could not flatten them together either.
    halves = quantize_model(
        tiny_models.llama(seed=0), compute_dtype=torch.float32, quant_storage=torch.bfloat16
    )
    with pytest.raises(
        ValueError,
        match=r"\[check_fsdp1\] the packed 4-bit weights are stored as bfloat16 but parameter "
        r"'model.embed_tokens.weight' is float32",
    ):
        check_fsdp1(halves)
    with pytest.raises(TypeError, match=r"\[check_fsdp1\] model must be a torch.nn.Module, got str"):
        check_fsdp1("model")
