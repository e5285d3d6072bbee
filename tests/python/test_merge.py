"""halo.merge / `halo merge` against PeftModel.merge_and_unload() on tiny models."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import halo
import numpy as np
import pytest
import torch
import transformers as T
from merge_fixtures import gpt2, llama, make_adapter, save_base

CASES = [
    ("llama", None, "plain"),
    ("llama", "40KB", "rslora"),
    ("llama", "40KB", "pattern"),
    ("llama", None, "dora"),
    ("llama", "40KB", "saved"),
    ("gpt2", None, "gpt2"),
    ("gpt2", None, "gpt2dora"),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    bases = {}
    for arch, shard in {(a, s) for a, s, _ in CASES}:
        model = llama() if arch == "llama" else gpt2()
        bases[(arch, shard)] = save_base(model, root / f"{arch}-{shard}", shard)
    return root, bases


def _assert_close_f32(got: dict, ref: dict):
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        g = got[k].float()
        scale = max(v.abs().max().item(), 1e-30)
        assert (g - v).abs().max().item() <= 1e-6 * scale, k


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    ia = a.view(torch.int16).to(torch.int32)
    ib = b.view(torch.int16).to(torch.int32)
    # Map sign-magnitude bit patterns onto a monotonic integer line.
    ia = torch.where(ia < 0, -32768 - ia, ia)
    ib = torch.where(ib < 0, -32768 - ib, ib)
    return int((ia - ib).abs().max().item())


@pytest.mark.parametrize(("arch", "shard", "kind"), CASES)
def test_merge_matches_peft(work, arch, shard, kind):
    root, bases = work
    base = bases[(arch, shard)]
    adapter, ref = make_adapter(base, kind, root / f"ad-{arch}-{shard}-{kind}")
    out = root / f"out-{arch}-{shard}-{kind}"
    summary = halo.merge(base, adapter, out, progress=False)
    assert summary.merged_modules > 0
    if shard:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        base_index = json.loads((base / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == base_index["weight_map"]
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    model = T.AutoModelForCausalLM.from_pretrained(out)
    _assert_close_f32(model.state_dict(), ref)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_merge_half_within_one_ulp(work, dtype):
    root, bases = work
    base = bases[("llama", "40KB")]
    adapter, ref = make_adapter(base, "pattern", root / f"ad-half-{dtype}")
    out = root / f"out-half-{dtype}"
    halo.merge(base, adapter, out, dtype=dtype, progress=False)
    tdt = torch.float16 if dtype == "fp16" else torch.bfloat16
    model = T.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    got = model.state_dict()
    for k, v in ref.items():
        assert got[k].dtype == tdt, k
        assert _ulp_distance(got[k].contiguous(), v.to(tdt).contiguous()) <= 1, k


def test_merge_bfloat16_base_within_one_ulp(tmp_path):
    base = save_base(llama().to(torch.bfloat16), tmp_path / "base-bf16", "40KB")
    adapter, ref = make_adapter(base, "dora", tmp_path / "ad")
    out = tmp_path / "out"
    halo.merge(base, adapter, out, progress=False)
    got = T.AutoModelForCausalLM.from_pretrained(out, dtype="auto").state_dict()
    for k, v in ref.items():
        assert got[k].dtype == torch.bfloat16, k
        assert _ulp_distance(got[k].contiguous(), v.to(torch.bfloat16).contiguous()) <= 1, k


def test_merge_nf4_loads_in_transformers(work):
    import bitsandbytes.functional as bnbf

    root, bases = work
    base = bases[("llama", None)]
    adapter, ref = make_adapter(base, "plain", root / "ad-nf4")
    out = root / "out-nf4"
    halo.merge(base, adapter, out, quantize="nf4", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    model = T.AutoModelForCausalLM.from_pretrained(out)
    import bitsandbytes as bnb

    q = model.model.layers[1].mlp.down_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    # bitsandbytes' own NF4 + double quant of PEFT's merged weight gives the same bytes.
    w = ref["model.layers.1.mlp.down_proj.weight"]
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(q.weight.data.reshape(-1), packed.reshape(-1))
    got = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    want = bnbf.dequantize_4bit(packed, state).float()
    assert torch.allclose(got, want, rtol=0, atol=1e-3 * w.abs().max().item())
    assert torch.equal(model.lm_head.weight.float(), ref["lm_head.weight"].half().float())
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def _cli(*args, env=None):
    return subprocess.run(  # noqa: PLW1510 - the exit code is the point
        [sys.executable, "-m", "halo.cli", "merge", *args],
        capture_output=True,
        text=True,
        env=env or os.environ.copy(),
    )


def test_cli_merge_and_errors(work, tmp_path):
    _root, bases = work
    base = bases[("llama", "40KB")]
    adapter, ref = make_adapter(base, "plain", tmp_path / "ad")
    out = tmp_path / "out"
    r = _cli("--base", str(base), "--adapter", str(adapter), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    _assert_close_f32(T.AutoModelForCausalLM.from_pretrained(out).state_dict(), ref)

    def fails(args, message):
        res = _cli(*args)
        assert res.returncode != 0
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], res.stderr

    common = ["--adapter", str(adapter), "--out"]
    fails(["--base", str(base), *common, str(out)], "not empty")
    fails(["--base", str(tmp_path / "missing"), *common, str(tmp_path / "o2")], "does not exist")
    fails(
        ["--base", str(base), "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")],
        "does not exist",
    )
    # An adapter for GPT-2 does not fit the LLaMA base.
    g_adapter, _ = make_adapter(bases[("gpt2", None)], "gpt2", tmp_path / "g-ad")
    fails(["--base", str(base), "--adapter", str(g_adapter), "--out", str(tmp_path / "o3")], "has no weight")
    # Truncated shard.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in base.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = max(broken.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    fails(["--base", str(broken), *common, str(tmp_path / "o4")], "truncated")
    # Pickled adapter weights that are not plain tensors are refused.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    torch.save({"x": datetime.date(2020, 1, 1)}, pickled / "adapter_model.bin")
    fails(["--base", str(base), "--adapter", str(pickled), "--out", str(tmp_path / "o5")], "convert it")
    for name in ("o2", "o3", "o4", "o5"):
        assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if ".halo-tmp" in p.name]
    # --force replaces a non-empty output.
    r = _cli("--base", str(base), "--adapter", str(adapter), "--out", str(out), "--force", "--quiet")
    assert r.returncode == 0, r.stderr


def test_shape_mismatch_is_reported(work, tmp_path):
    _root, bases = work
    base = bases[("llama", None)]
    adapter, _ = make_adapter(base, "plain", tmp_path / "ad")
    sd = halo.io.load_safetensors(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    sd = dict(sd)
    sd[key] = np.zeros((4, 10), np.float32)
    halo.io.save_safetensors(adapter / "adapter_model.safetensors", sd, {"format": "pt"})
    with pytest.raises(ValueError, match="does not fit base tensor"):
        halo.merge(base, adapter, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
