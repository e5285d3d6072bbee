"""PEFT adapter folders: what PEFT writes halo reads, and what halo writes PEFT loads."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers as T
from halo.io.adapter import read_adapter, write_adapter
from tiny_models import llama, make_adapter, save_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(llama(), tmp_path_factory.mktemp("peft-base") / "base")


def _lora_layers(pm):
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer) and "default" in mod.lora_A:
            yield name, mod


@pytest.mark.parametrize("kind", ["pattern", "rslora", "dora", "saved"])
def test_reads_what_peft_wrote(base, tmp_path, kind):
    folder, _ = make_adapter(base, kind, tmp_path / "ad")
    adapter = read_adapter(folder)
    pm = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(base), folder)
    layers = dict(_lora_layers(pm))
    assert sorted(layers) == sorted(adapter.modules)
    for name, mod in layers.items():
        m = adapter.modules[name]
        np.testing.assert_array_equal(m.lora_A, mod.lora_A["default"].weight.detach().numpy())
        np.testing.assert_array_equal(m.lora_B, mod.lora_B["default"].weight.detach().numpy())
        assert m.scaling == pytest.approx(mod.scaling["default"], rel=1e-12), name
        if kind == "dora":
            np.testing.assert_array_equal(
                m.magnitude, mod.lora_magnitude_vector["default"].weight.detach().numpy()
            )
        else:
            assert m.magnitude is None
    if kind == "saved":
        np.testing.assert_array_equal(
            adapter.saved_tensors["lm_head.weight"],
            pm.base_model.model.lm_head.modules_to_save["default"].weight.detach().numpy(),
        )


@pytest.mark.parametrize("kind", ["pattern", "dora", "saved"])
def test_peft_loads_what_halo_wrote(base, tmp_path, kind):
    folder, _ = make_adapter(base, kind, tmp_path / "ad")
    out = tmp_path / "rewritten"
    write_adapter(out, read_adapter(folder))
    x = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(base), folder)(x).logits
        got = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(base), out)(x).logits
    assert torch.equal(ref, got)
    cfg_in = json.loads((folder / "adapter_config.json").read_text())
    cfg_out = json.loads((out / "adapter_config.json").read_text())
    assert cfg_in == cfg_out


def test_bin_adapter_read_with_weights_only(base, tmp_path):
    folder, _ = make_adapter(base, "plain", tmp_path / "ad")
    from safetensors.torch import load_file

    sd = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(sd, folder / "adapter_model.bin")
    adapter = read_adapter(folder)
    key = "model.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(
        adapter.modules[key].lora_A, sd[f"base_model.model.{key}.lora_A.weight"].numpy()
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": 0}, "positive integer"),
        ({"peft_type": "IA3"}, "not supported"),
        ({"rank_pattern": [1]}, "must be an object"),
        ({"lora_alpha": "x"}, "lora_alpha must be a finite number"),
        # Issue 9: each of these crashed, hung on a regex error or merged silently wrong.
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer, got 0"),
        ({"rank_pattern": {"[": 4}}, "rank_pattern key '\\[' is not a valid regular expression"),
        ({"alpha_pattern": {"q_proj": "3"}}, r"alpha_pattern\['q_proj'\] must be a finite number, got '3'"),
        ({"alpha_pattern": {"q_proj": None}}, r"alpha_pattern\['q_proj'\] must be a finite number"),
        ({"r": -1}, "r must be a positive integer, got -1"),
        ({"r": None}, "r must be a positive integer, got None"),
        ({"r": 4.5}, "r must be a positive integer, got 4.5"),
        ({"r": 4.0}, "r must be a positive integer, got 4.0"),
        ({"r": True}, "r must be a positive integer, got True"),
        ({"rank_pattern": {"q_proj": -2}}, r"rank_pattern\['q_proj'\] must be a positive integer, got -2"),
        (
            {"rank_pattern": {"q_proj": None}},
            r"rank_pattern\['q_proj'\] must be a positive integer, got None",
        ),
        ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\] must be a positive integer, got 2.5"),
        ({"r": 8}, "r is 8 but module '.*' has rank 4"),
        ({"rank_pattern": {"v_proj": 2}}, r"rank_pattern\['v_proj'\] is 2 but module .*v_proj' has rank 4"),
        ({"lora_alpha": 1e40}, "lora_alpha = 1e\\+40 gives module .* a scaling of 2.5e\\+39, beyond float32"),
        ({"alpha_pattern": {"o_proj": 2e39}}, r"alpha_pattern\['o_proj'\] = 2e\+39 gives"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number, got nan"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number, got inf"),
        ({"use_rslora": "false"}, "use_rslora must be true or false, got 'false'"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false, got 1"),
    ],
)
def test_bad_config(base, tmp_path, change, message):
    folder, _ = make_adapter(base, "plain", tmp_path / "ad")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(change)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message) as info:
        read_adapter(folder)
    # One line naming the file and the field, like every halo error.
    text = str(info.value)
    assert "\n" not in text and text.startswith("[read_adapter] ") and "adapter_config.json" in text


def test_peft_refuses_what_halo_refuses(base, tmp_path):
    """The reference: PEFT itself refuses these (with assorted exception types) or merges them
    into inf weights; halo turns each into one ValueError before any tensor is touched."""
    folder, _ = make_adapter(base, "plain", tmp_path / "ad")
    cfg0 = json.loads((folder / "adapter_config.json").read_text())
    for change in ({"rank_pattern": {"q_proj": 0}}, {"rank_pattern": {"[": 4}}, {"r": 8}, {"r": 4.5}):
        (folder / "adapter_config.json").write_text(json.dumps({**cfg0, **change}))
        with pytest.raises(Exception):  # noqa: B017 - PEFT raises ValueError, re.error, RuntimeError, TypeError
            peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(base), folder)
    (folder / "adapter_config.json").write_text(json.dumps({**cfg0, "lora_alpha": 1e40}))
    merged = peft.PeftModel.from_pretrained(
        T.AutoModelForCausalLM.from_pretrained(base), folder
    ).merge_and_unload()
    assert not torch.isfinite(merged.model.layers[0].self_attn.q_proj.weight).all()


def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither"):
        read_adapter(tmp_path)
