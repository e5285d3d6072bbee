"""halo.hf drop-in: HaloConfig in from_pretrained, quantize_model, bitsandbytes checkpoints
without bitsandbytes, PEFT (fused layer, seeded dropout, standard adapters), kbit training
preparation, generation, and a short fine-tune of the real model (SmolLM2-135M)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import halo.hf  # noqa: E402
import halo.nn as hnn  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(tiny_config()).save_pretrained(path)
    return path


def linear_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if "proj" in k}


def test_from_pretrained_with_haloconfig_equals_quantize_model(tiny_dir):
    loaded = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=halo.hf.HaloConfig())
    float_model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    quantized = halo.hf.quantize_model(float_model)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, hnn.Linear4bit)
    assert isinstance(loaded.lm_head, torch.nn.Linear) and not isinstance(loaded.lm_head, hnn.Linear4bit)
    ours, theirs = linear_state(loaded), linear_state(quantized)
    assert list(ours) == list(theirs) and len(ours) == 2 * 7 * 6  # six bitsandbytes entries per layer
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, quantized(ids).logits)


def test_halo_checkpoint_saves_bnb_layout_and_reloads(tiny_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=halo.hf.HaloConfig())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "halo_4bit" and saved["quant_type"] == "nf4"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.model.layers[1].self_attn.q_proj, hnn.Linear4bit)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_bitsandbytes_checkpoint_loads_without_bitsandbytes(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")  # only to make the checkpoint and the expected logits
    # Rows a multiple of 64 wide: bitsandbytes' own CPU kernels mis-handle blocks that straddle
    # rows (its dequantized 64x160 weight differs from its own saved bytes), halo does not.
    torch.manual_seed(0)
    tiny = tiny_config()
    tiny.intermediate_size = 128
    LlamaForCausalLM(tiny).save_pretrained(tmp_path / "float")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config).save_pretrained(
        tmp_path / "bnb"
    )
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb")
    theirs.train()  # bitsandbytes' CPU inference path repacks weights; training mode keeps its plain kernel
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        expected = theirs(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    assert bnb is not None
    script = f"""
import sys, torch
sys.modules["bitsandbytes"] = None  # any import of bitsandbytes now fails
import halo.hf
model = halo.hf.load_bnb_checkpoint({str(tmp_path / "bnb")!r})
expected = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    got = model(expected["ids"]).logits
torch.testing.assert_close(got, expected["logits"], rtol=1e-4, atol=1e-4)
import halo.nn
print("OK", isinstance(model.model.layers[0].self_attn.q_proj, halo.nn.Linear4bit))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK True" in result.stdout


def fp4_error_per_block(layer: hnn.Linear4bit, weight: torch.Tensor) -> float:
    """Largest |dequantized - float| of a layer's weight, in units of its 64-block's absmax."""
    blocks = weight.detach().reshape(-1, 64)
    error = (layer.dequantize(torch.float32).reshape(-1, 64) - blocks).abs()
    return (error / blocks.abs().amax(1, keepdim=True)).max().item()


# Half the widest gap of bitsandbytes' fp4 values (2/3 -> 1), plus the nested absmax's
# 8-bit error. NF4 codes read as fp4 (or fp4 as nf4) land near 1.4 absmax away.
FP4_BOUND = 1 / 6 + 0.015


def test_fp4_checkpoint_saved_by_halo_reloads_as_fp4(tiny_dir, tmp_path):
    config = halo.hf.HaloConfig(quant_type="fp4", compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_type"] == "fp4"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    float_model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    layers = {n: m for n, m in reloaded.named_modules() if isinstance(m, hnn.Linear4bit)}
    assert len(layers) == 2 * 7
    for name, layer in layers.items():
        assert layer.quant_type == "fp4", name
        # The independent reference: the float weights, within fp4's (not nf4's) error.
        assert fp4_error_per_block(layer, float_model.get_submodule(name).weight) < FP4_BOUND, name
        assert torch.equal(
            layer.dequantize(torch.float32), model.get_submodule(name).dequantize(torch.float32)
        )
    # The state-dict loader too: an nf4 model takes the fp4 state (and its quant_type).
    nf4 = halo.hf.quantize_model(LlamaForCausalLM(tiny_config()), compute_dtype=torch.float32)
    nf4.load_state_dict(model.state_dict())
    assert all(m.quant_type == "fp4" for m in nf4.modules() if isinstance(m, hnn.Linear4bit))
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(nf4(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_fp4_bitsandbytes_checkpoint_loads_as_fp4(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")  # the checkpoint and the reference weights and logits
    torch.manual_seed(0)
    tiny = tiny_config()
    tiny.intermediate_size = 128  # rows a multiple of 64 wide (see the nf4 test above)
    float_model = LlamaForCausalLM(tiny)
    float_model.save_pretrained(tmp_path / "float")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config).save_pretrained(
        tmp_path / "bnb"
    )
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb")
    theirs.train()  # bitsandbytes' plain CPU kernel (see the nf4 test above)
    ours = halo.hf.load_bnb_checkpoint(tmp_path / "bnb")
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, hnn.Linear4bit)}
    assert len(layers) == 2 * 7
    for name, layer in layers.items():
        assert layer.quant_type == "fp4", name
        their_layer = theirs.get_submodule(name)
        expected = bnb.functional.dequantize_4bit(their_layer.weight.data, their_layer.weight.quant_state)
        assert torch.equal(layer.dequantize(torch.float32), expected.float()), name
        assert fp4_error_per_block(layer, float_model.get_submodule(name).weight) < FP4_BOUND, name
    assert ours.config.quantization_config.quant_type == "fp4"  # what a re-save writes
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_skip_modules_match_whole_module_names_as_transformers_does(tmp_path):
    """A pattern skips a module when it matches from the start up to a name boundary, or as
    a suffix (transformers' rule for llm_int8_skip_modules), never as a bare substring."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=12,  # layers.1 and layers.11
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    patterns = ["mlp.gate", "model.layers.1", "down_proj"]
    projections = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    ]
    # "mlp.gate" is neither a prefix nor a suffix of "...mlp.gate_proj": it skips nothing;
    # "model.layers.1" skips layer 1 whole, not layer 11; "down_proj" skips it in every layer.
    expected = {f"model.layers.1.{p}" for p in projections}
    expected |= {f"model.layers.{i}.mlp.down_proj" for i in range(12)}

    def in_float(model) -> set[str]:
        return {n for n, m in model.named_modules() if type(m) is torch.nn.Linear} - {"lm_head"}

    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=halo.hf.HaloConfig(skip_modules=patterns)
    )
    assert in_float(loaded) == expected
    assert isinstance(loaded.model.layers[11].mlp.gate_proj, hnn.Linear4bit)
    quantized = halo.hf.quantize_model(LlamaForCausalLM(config), skip_modules=patterns)
    assert in_float(quantized) == expected
    if importlib.util.find_spec("bitsandbytes") is not None:
        # transformers' own bitsandbytes loader leaves the same projections in float.
        bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=patterns)
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config)
        assert in_float(theirs) == expected


def peft_pair(dropout: float):
    """(halo-quantized PEFT model, PEFT model on the float base holding the dequantized weights)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config())
    quantized = halo.hf.quantize_model(copy.deepcopy(base), compute_dtype=None)
    reference = copy.deepcopy(base)
    for name, module in quantized.named_modules():
        if isinstance(module, hnn.Linear4bit):
            reference.get_submodule(name).weight.data = module.dequantize(torch.float32)

    def config():
        return peft.LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=dropout,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        )

    torch.manual_seed(1)
    ours = peft.get_peft_model(quantized, halo.hf.register_lora(config()))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(reference, config())
    return ours, theirs


def test_peft_fused_layer_reproduces_peft_with_seeded_dropout():
    ours, theirs = peft_pair(dropout=0.2)
    assert isinstance(ours.base_model.model.model.layers[0].self_attn.q_proj, halo.hf.PeftLinear4bit)
    ids = torch.randint(0, 128, (2, 16))
    ours.train()
    theirs.train()
    torch.manual_seed(5)
    loss_ours = ours(input_ids=ids, labels=ids).loss
    torch.manual_seed(5)
    loss_theirs = theirs(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-5)
    loss_ours.backward()
    loss_theirs.backward()
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads_ours.keys() == grads_theirs.keys() and len(grads_ours) == 2 * 7 * 2
    for name, grad in grads_theirs.items():
        torch.testing.assert_close(
            grads_ours[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name
        )
    # A different seed draws a different mask: the match above is not an accident of p.
    torch.manual_seed(6)
    assert not torch.isclose(ours(input_ids=ids, labels=ids).loss, loss_theirs)


def test_adapter_saved_from_halo_loads_on_the_float_base(tmp_path):
    ours, theirs = peft_pair(dropout=0.0)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and "_custom_modules" not in config
    base = copy.deepcopy(theirs.get_base_model())
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_merge_into_the_4bit_layer_requantizes_the_float_merge():
    import halo

    ours, _ = peft_pair(dropout=0.0)
    lora = ours.base_model.model.model.layers[0].self_attn.q_proj
    before = lora.get_base_layer().dequantize(torch.float32)
    delta = (lora.lora_B["default"].weight @ lora.lora_A["default"].weight) * lora.scaling["default"]
    expected = halo.quantize_4bit((before + delta).detach(), "nf4", 64, double_quant=True)
    merged = ours.merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    assert isinstance(layer, hnn.Linear4bit)
    assert torch.equal(layer.weight, torch.from_numpy(expected.packed))
    assert torch.equal(layer.weight_absmax, torch.from_numpy(expected.absmax))


def test_prepare_model_for_kbit_training_and_generation(tmp_path):
    # Weights large enough that attention and MLP steer the next token (at the default 0.02
    # init the tied embedding alone decides it, and broken 4-bit layers would go unnoticed).
    torch.manual_seed(7)
    float_model = LlamaForCausalLM(tiny_config())
    with torch.no_grad():
        for param in float_model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    float_model.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=halo.hf.HaloConfig(compute_dtype=torch.float32)
    )
    # The independent reference: transformers' float model holding the dequantized weights
    # (halo.dequantize_4bit of each layer's bitsandbytes state, the function checked
    # bit-exact against bitsandbytes in test_quant), run by torch's own nn.Linear.
    reference = LlamaForCausalLM.from_pretrained(tmp_path)
    skeleton = copy.deepcopy(reference)  # the float model with its projections zeroed
    layers = {n: m for n, m in model.named_modules() if isinstance(m, hnn.Linear4bit)}
    assert len(layers) == 2 * 7
    for name, layer in layers.items():
        state = {k: v for k, v in layer.state_dict().items() if k != "bias"}
        qt = halo.QuantizedTensor.from_bnb_state_dict(state, "weight")
        weight = torch.as_tensor(halo.dequantize_4bit(qt, "float32"))
        reference.get_submodule(name).weight.data.copy_(weight.reshape(layer.out_features, layer.in_features))
        skeleton.get_submodule(name).weight.data.zero_()
    ids = torch.randint(0, 128, (2, 6))
    greedy = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        generated = model.generate(ids, **greedy)
        expected = reference.generate(ids, **greedy)
        without_layers = skeleton.generate(ids, **greedy)
    assert generated.sequences.shape == (2, 14)
    assert torch.equal(generated.sequences, expected.sequences), (generated.sequences, expected.sequences)
    # The scores too: identical tokens alone would let a small error in one layer through.
    for ours, theirs in zip(generated.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.equal(expected.sequences[:, 6:], without_layers.sequences[:, 6:])  # the layers matter
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    config = halo.hf.register_lora(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    model = peft.get_peft_model(model, config)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)


def test_bad_configs_give_clear_errors():
    with pytest.raises(ValueError, match=r"\[HaloConfig\] quant_type must be 'nf4' or 'fp4', got 'int3'"):
        halo.hf.HaloConfig(quant_type="int3")
    with pytest.raises(TypeError, match=r"\[HaloConfig\] compute_dtype"):
        halo.hf.HaloConfig(compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="blocksize"):
        halo.hf.HaloConfig(blocksize=100)
    with pytest.raises(TypeError, match="unknown settings"):
        halo.hf.HaloConfig(load_in_4bit=True)
    with pytest.raises(ValueError, match=r"\[quantize_model\] the model has no nn.Linear"):
        halo.hf.quantize_model(torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1)))
    with pytest.raises(TypeError, match=r"\[register_lora\] expected a peft.LoraConfig"):
        halo.hf.register_lora({"r": 4})
    model = halo.hf.quantize_model(LlamaForCausalLM(tiny_config()))
    dora = halo.hf.register_lora(peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        peft.get_peft_model(model, dora)


def test_smollm2_short_finetune_loss_falls(smollm2_dir):
    """The real-model check: 30 steps of QLoRA on SmolLM2-135M, sequence <= 24."""
    from halo.optim import AdamW8bit

    model_dir = smollm2_dir  # `make model`, made now if missing (skips only if it cannot be)
    start = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=halo.hf.HaloConfig(compute_dtype=torch.float32)
    )
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = halo.hf.register_lora(
        peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    model = peft.get_peft_model(model, config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = "The halo library quantizes weights to four bits and trains small adapters on top of them."
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :24]
    opt = AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-3, min_8bit_size=1)
    losses = []
    model.train()
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(
        f"SmolLM2 30 steps: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - start:.1f} s"
    )
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.isfinite(torch.tensor(losses)))
