"""halo as a drop-in for bitsandbytes in a transformers + PEFT QLoRA script.

``qlora_script`` is the script a bitsandbytes user writes (load in 4 bits,
``prepare_model_for_kbit_training``, ``get_peft_model(LoraConfig)``, train with ``Trainer``,
save the adapter, reload it with ``PeftModel.from_pretrained`` on a freshly loaded 4-bit
base, ``merge_and_unload``). Only what a halo user changes is a parameter: the quantization
config and the optimizer (``lora_config_hook`` is the identity, or the older
``halo.hf.register_lora``, which must change nothing). The checks are on results: the loss
falls, the reloaded adapter reproduces the trained model's logits, and the merged layers
are what bitsandbytes gives for the re-quantized float merge.
"""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import halo.hf  # noqa: E402
import halo.nn as hnn  # noqa: E402
from halo.hf.peft_layers import LoraLinear4bit, PeftLinear4bit  # noqa: E402
from halo.optim import PagedAdamW8bit  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Tokens(torch.utils.data.Dataset):
    """A few fixed token rows, repeated: a causal LM can learn them in a few steps."""

    def __init__(self, vocab: int, rows: int, seq: int, repeat: int) -> None:
        gen = torch.Generator().manual_seed(1)
        self.rows = torch.randint(3, vocab, (rows, seq), generator=gen)
        self.repeat = repeat

    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    def __getitem__(self, i: int) -> dict:
        ids = self.rows[i % len(self.rows)]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def qlora_script(model_dir, work, quantization_config, make_optimizer, lora_config_hook, steps, seq, lr):
    """The bitsandbytes script, line for line; the bitsandbytes values are in the comments."""
    # quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    #     bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization_config, dtype=torch.float32
    )
    model = peft.prepare_model_for_kbit_training(model)
    config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(model, lora_config_hook(config))
    args = transformers.TrainingArguments(
        output_dir=str(work / "run"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        # optim="paged_adamw_8bit",
    )
    vocab = model.config.vocab_size
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_Tokens(min(vocab, 4000), rows=4, seq=seq, repeat=steps * 4),
        optimizers=(make_optimizer(model), None),
    )
    trainer.train()
    model.save_pretrained(work / "adapter")

    base = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization_config, dtype=torch.float32
    )
    saved = lora_config_hook(peft.LoraConfig.from_pretrained(work / "adapter"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = peft.PeftModel.from_pretrained(base, work / "adapter", config=saved)
    assert not [w for w in caught if "adapter keys" in str(w.message)]  # every adapter key loaded
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model, reloaded, losses


def halo_config():
    return halo.hf.HaloConfig(quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)


def halo_optimizer(lr):
    return lambda model: PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=lr)


def _lora_layers(model) -> dict:
    """halo's fused LoRA layers that hold an adapter."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (LoraLinear4bit, PeftLinear4bit)) and len(m.lora_A) > 0
    }


def _plain(config):
    return config


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def run_and_check(
    model_dir, work, steps, seq, lr, min_drop, layers_expected, merge_every=1, reference=True, hook=_plain
):
    import bitsandbytes as bnb

    torch.manual_seed(0)  # the adapters' initial A (Trainer seeds only what follows it)
    model, reloaded, losses = qlora_script(
        model_dir, work, halo_config(), halo_optimizer(lr), hook, steps, seq, lr
    )
    # halo's fused layer on every targeted projection, in training and after reloading
    assert len(_lora_layers(model)) == layers_expected
    assert len(_lora_layers(reloaded)) == layers_expected
    # it learned: the loss of the last steps is well below the first
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    head, tail = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    print(f"losses {[round(loss, 3) for loss in losses]}")
    assert tail < (1.0 - min_drop) * head, losses

    ids = torch.randint(
        3, min(model.config.vocab_size, 4000), (2, seq), generator=torch.Generator().manual_seed(9)
    )
    trained = _logits(model, ids)
    # the saved adapter holds the adapter only (no base weight), under PEFT's usual names
    from safetensors.torch import load_file

    saved_keys = list(load_file(work / "adapter" / "adapter_model.safetensors"))
    assert len(saved_keys) == 2 * layers_expected and all(".lora_" in k for k in saved_keys), saved_keys[:4]
    # the saved adapter on a freshly loaded 4-bit base: the same bytes, the same kernels
    torch.testing.assert_close(_logits(reloaded, ids), trained, rtol=0, atol=0)
    # the adapter did something (so the match above is not base == base)
    with reloaded.disable_adapter():
        untrained = _logits(reloaded, ids)
    assert (untrained - trained).abs().max() > 1e-3

    # merge: each layer becomes the 4-bit quantization of dequant(W) + scaling * B A, byte for
    # byte what bitsandbytes gives for that float merge
    expected = {}
    for name, layer in list(_lora_layers(reloaded).items())[::merge_every]:
        base_layer = layer.get_base_layer()
        merged_float = base_layer.dequantize(torch.float32) + layer.get_delta_weight("default").float()
        packed, state = bnb.functional.quantize_4bit(
            merged_float.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True
        )
        expected[name.removeprefix("base_model.model.")] = (packed, state)
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = reloaded.merge_and_unload()
    for name, (packed, state) in expected.items():
        # what stays is the 4-bit layer, without adapters (in a fresh PeftLinear4bit PEFT can extend)
        layer = merged.get_submodule(name)  # the 4-bit layer, without adapters (PEFT can extend it again)
        assert isinstance(layer, hnn.Linear4bit) and len(layer.lora_A) == 0 and not layer.merged
        assert torch.equal(layer.weight.reshape(-1), packed.reshape(-1)), name
        assert torch.equal(layer.weight_absmax, state.absmax), name
        torch.testing.assert_close(layer.weight_nested_absmax, state.state2.absmax, rtol=0, atol=0)
    assert not any("lora" in key for key in merged.state_dict())
    if not reference:
        return losses
    # the merged model computes on those layers: its logits are those of a float copy holding
    # bitsandbytes' own decoding of each merged layer (to the bfloat16 compute's rounding); how
    # far that is from the unmerged model is the price of re-quantizing (printed, not a property)
    reference = copy.deepcopy(merged)
    for name, (packed, state) in expected.items():
        layer = merged.get_submodule(name)
        dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(bnb.functional.dequantize_4bit(packed, state).float())
            if layer.bias is not None:
                dense.bias.copy_(layer.bias.float())
        reference.set_submodule(name, dense)
    merged_logits, reference_logits = _logits(merged, ids), _logits(reference, ids)
    rel = ((merged_logits - reference_logits).norm() / reference_logits.norm()).item()
    requant = ((merged_logits - trained).norm() / trained.norm()).item()
    print(f"merged vs float reference {rel:.4f}, merged vs unmerged {requant:.4f} (relative)")
    assert rel < 0.02
    return losses


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bnb_qlora_script_runs_on_halo_tiny(arch, request, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if arch == "qwen2":  # biases on q/k/v
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    layers = 7 * config.num_hidden_layers
    run_and_check(model_dir, tmp_path, steps=16, seq=16, lr=1e-2, min_drop=0.1, layers_expected=layers)


def test_bnb_qlora_script_runs_on_halo_smollm2(smollm2_dir, tmp_path):
    """The real model: a few steps on SmolLM2-135M, sequence 16; the merge checked on every 15th
    layer against bitsandbytes (the float-reference logits check runs on the tiny models)."""
    run_and_check(
        smollm2_dir,
        tmp_path,
        steps=4,
        seq=16,
        lr=5e-3,
        min_drop=0.1,
        layers_expected=7 * 30,
        merge_every=15,
        reference=False,
    )


def test_register_lora_changes_nothing_on_a_halo_loaded_model(tiny_llama_dir, tmp_path):
    """Scripts written for the older three-line drop-in (``register_lora`` on the config) run
    the same, to the same losses as the plain config."""
    config = transformers.AutoConfig.from_pretrained(tiny_llama_dir)
    kwargs = dict(steps=6, seq=16, lr=1e-2, min_drop=0.0, layers_expected=7 * config.num_hidden_layers)
    plain = run_and_check(tiny_llama_dir, tmp_path / "plain", reference=False, **kwargs)
    registered = run_and_check(
        tiny_llama_dir, tmp_path / "registered", reference=False, hook=halo.hf.register_lora, **kwargs
    )
    assert plain == registered


def test_a_plain_lora_config_gives_halo_layers_with_plain_keys(tiny_llama_dir):
    """No register_lora: PEFT extends the loaded layers in place (no ``base_layer.`` in the base
    weights' keys, so the 4-bit checkpoint keys are bitsandbytes' own), and the forward is the
    fused op's."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=halo_config()
    )
    keys = set(model.state_dict())
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"))
    layers = _lora_layers(model)
    assert len(layers) == 14 and all(isinstance(m, PeftLinear4bit) for m in layers.values())
    base_keys = {k.removeprefix("base_model.model.") for k in model.state_dict() if "lora_" not in k}
    assert base_keys == keys
    layer = next(iter(layers.values()))
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(torch.randn(2, layer.in_features))
    assert "halo::lora_linear" in {event.key for event in prof.key_averages()}


def test_a_halo_layer_without_adapters_is_the_plain_layer(tiny_llama_dir):
    """Before PEFT adds an adapter (and after ``unload``) the layer computes what Linear4bit does,
    and the loaded model is frozen as PEFT would freeze it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=halo_config()
    )
    assert not any(p.requires_grad for p in model.parameters())
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, PeftLinear4bit))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        expected = hnn.Linear4bit.forward(layer, x)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    config = peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        assert not torch.equal(layer(x), expected)  # the adapter (random B) now adds to it
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    unloaded = peft_model.unload()
    assert unloaded.get_submodule(name) is layer and len(layer.lora_A) == 0
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
