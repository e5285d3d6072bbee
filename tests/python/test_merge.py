"""halo.merge / `halo merge` against PeftModel.merge_and_unload() on tiny models."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import halo
import numpy as np
import peft
import pytest
import torch
import transformers as T
from tiny_models import gpt2, llama, make_adapter, save_base

INDEX = "model.safetensors.index.json"
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


def _cli(*args, env=None, timeout=None):
    return subprocess.run(
        [sys.executable, "-m", "halo.cli", "merge", *args],
        capture_output=True,
        text=True,
        env=env or os.environ.copy(),
        timeout=timeout,
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


# -- hostile output paths, signals, stale temp folders, hostile configs (issue 9) ----------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A sharded tiny LLaMA and a plain adapter, with PEFT's merged state dict."""
    root = tmp_path_factory.mktemp("merge-small")
    base = save_base(llama(), root / "base", "40KB")
    adapter, ref = make_adapter(base, "plain", root / "adapter")
    return base, adapter, ref


def _snapshot(*folders) -> dict:
    return {str(p): p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def _copy_tree(src, dst):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("base", "is the base folder"),
        ("adapter", "is the adapter folder"),
        ("parent", "contains the base folder"),
        ("inside-base", "lies inside the base folder"),
        ("base-file", "lies inside the base folder"),
        ("adapter-file", "lies inside the adapter folder"),
        ("link-to-adapter", "is the adapter folder"),
        ("blob-folder", "contains the base file"),
    ],
)
def test_force_refuses_an_output_that_overlaps_an_input(small, tmp_path, where, message):
    base0, adapter0, _ = small
    root = tmp_path / "root"
    base = _copy_tree(base0, root / "base")
    adapter = _copy_tree(adapter0, root / "adapter")
    if where == "blob-folder":  # Hugging Face cache layout: the model files are links into blobs/
        blobs = tmp_path / "blobs"
        blobs.mkdir()
        for f in list(base.glob("*.safetensors")):
            (blobs / f.name).write_bytes(f.read_bytes())
            f.unlink()
            f.symlink_to(blobs / f.name)
    out = {
        "base": base,
        "adapter": adapter,
        "parent": root,
        "inside-base": base / "merged",
        "base-file": base / "config.json",
        "adapter-file": adapter / "adapter_model.safetensors",
        "link-to-adapter": tmp_path / "link",
        "blob-folder": tmp_path / "blobs",
    }[where]
    if where == "link-to-adapter":
        out.symlink_to(adapter, target_is_directory=True)
    before = _snapshot(root, tmp_path / "blobs") if where == "blob-folder" else _snapshot(root)
    res = _cli("--base", str(base), "--adapter", str(adapter), "--out", str(out), "--force", "--quiet")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and message in lines[0], res.stderr
    after = _snapshot(root, tmp_path / "blobs") if where == "blob-folder" else _snapshot(root)
    assert after == before  # every input byte is still there
    assert not [p for p in tmp_path.rglob("*") if ".halo-" in p.name]


_SIGNAL_SCRIPT = """
import os, signal, sys
import halo.lora.merge_checkpoint

# A shell that starts jobs in the background without job control makes them ignore SIGINT, and
# Python then keeps it ignored: put back the default (KeyboardInterrupt) that an interactive user has.
signal.signal(signal.SIGINT, signal.default_int_handler)
from halo.cli import main

merge = sys.modules["halo.lora.merge_checkpoint"]

signum, steps = int(sys.argv[1]), {"n": 0}
step = merge._Progress.step


def step_then_signal(self, nbytes):  # signal this process in the middle of the merge
    step(self, nbytes)
    steps["n"] += 1
    if steps["n"] == 3:
        os.kill(os.getpid(), signum)


merge._Progress.step = step_then_signal
sys.exit(main(["merge", *sys.argv[2:]]))
"""


def _merge_with_signal(signum, base, adapter, out, *extra):
    return subprocess.run(
        [
            sys.executable,
            "-c",
            _SIGNAL_SCRIPT,
            str(int(signum)),
            "--base",
            str(base),
            "--adapter",
            str(adapter),
            "--out",
            str(out),
            "--quiet",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_mid_merge_leaves_nothing_behind(small, tmp_path, signum):
    base, adapter, _ = small
    out = tmp_path / "out"
    res = _merge_with_signal(signum, base, adapter, out)
    assert res.returncode == 128 + int(signum), res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], res.stderr
    assert list(tmp_path.iterdir()) == []  # no output, no .out.halo-tmp-PID


def test_signal_mid_force_keeps_the_old_output(small, tmp_path):
    base, adapter, _ = small
    out = tmp_path / "out"
    halo.merge(base, adapter, out, progress=False)
    before = _snapshot(out)
    res = _merge_with_signal(signal.SIGTERM, base, adapter, out, "--force")
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_temp_folders_of_dead_runs_are_removed(small, tmp_path):
    base, adapter, ref = small
    out = tmp_path / "out"
    res = _merge_with_signal(signal.SIGKILL, base, adapter, out)
    assert res.returncode == -signal.SIGKILL
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.halo-tmp-")]
    assert len(stale) == 1 and any(stale[0].glob("*.safetensors*"))  # what SIGKILL leaves
    # Folders that must survive: one of a live process, one written on another host.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / f".out.halo-tmp-{live.pid}").mkdir()
        dead_pid = stale[0].name.rsplit("-", 1)[1]
        other_host = tmp_path / f".out.halo-old-{dead_pid}"
        other_host.mkdir()
        (other_host / ".halo-owner").write_text("some-other-host\n")
        halo.merge(base, adapter, out, progress=False)
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted(["out", f".out.halo-tmp-{live.pid}", f".out.halo-old-{dead_pid}"])
    finally:
        live.kill()
        live.wait()
    _assert_close_f32(T.AutoModelForCausalLM.from_pretrained(out).state_dict(), ref)


def test_force_swaps_the_output_in_without_a_gap(small, tmp_path, monkeypatch):
    """--force must never leave --out missing: after every rename or delete the merge makes,
    --out holds a complete output (the old one, then the new one)."""
    base, adapter, ref = small
    out = tmp_path / "out"
    halo.merge(base, adapter, out, progress=False)
    (out / "generation_config.json").write_text('{"old": true}')  # tells the old output from the new
    states = []

    def watch(fn):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            states.append((fn.__name__, (out / "config.json").is_file() and (out / INDEX).is_file()))
            return result

        return wrapped

    for module, name in [
        (os, "rename"),
        (os, "replace"),
        (os, "unlink"),
        (shutil, "rmtree"),
        (shutil, "move"),
    ]:
        monkeypatch.setattr(module, name, watch(getattr(module, name)))
    halo.merge(base, adapter, out, progress=False, force=True)
    monkeypatch.undo()
    assert all(complete for _, complete in states), states
    assert "old" not in json.loads((out / "generation_config.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    _assert_close_f32(T.AutoModelForCausalLM.from_pretrained(out).state_dict(), ref)


def test_no_fsync_gives_the_same_output(small, tmp_path):
    base, adapter, _ = small
    halo.merge(base, adapter, tmp_path / "a", progress=False)
    r = _cli(
        "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "b"), "--no-fsync", "--quiet"
    )
    assert r.returncode == 0, r.stderr
    a, b = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b")
    assert [k.replace("/a/", "/b/", 1) for k in a] == list(b) and list(a.values()) == list(b.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": 10**9}, "num_hidden_layers = 1000000000 does not fit the checkpoint"),
        ({"num_hidden_layers": 3}, "num_hidden_layers = 3, but the checkpoint's tensors hold 2 layers"),
        ({"num_hidden_layers": 1}, "num_hidden_layers = 1, but the checkpoint's tensors hold 2 layers"),
        ({"intermediate_size": 100}, "gives 'model.layers.0.mlp.gate_proj.weight' the shape \\[100, 64\\]"),
    ],
)
def test_nf4_refuses_a_config_that_does_not_fit_the_tensors(small, tmp_path, change, message):
    base0, adapter, _ = small
    base = _copy_tree(base0, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(change)
    (base / "config.json").write_text(json.dumps(cfg))
    # In a child with a time limit: before the fix, 10**9 layers hung while memory grew.
    try:
        res = _cli(
            "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
            "--quantize", "nf4", "--quiet", timeout=120,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("halo merge --quantize nf4 did not finish within 120 s on a hostile config.json")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json" in lines[0], res.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["alpha", "delta"])
def test_merges_that_overflow_float32_are_refused(small, tmp_path, case):
    """lora_alpha 1e40 gives a scaling finite in double but not in float32; lora_B near float32's
    maximum a finite scaling whose delta overflows. PEFT writes inf weights for both (checked)."""
    base, adapter0, _ = small
    adapter = _copy_tree(adapter0, tmp_path / "adapter")
    if case == "alpha":
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg["lora_alpha"] = 1e40
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))
        message = "lora_alpha = 1e+40 gives module"
    else:
        path = adapter / "adapter_model.safetensors"
        sd = {
            k: np.full_like(v, 3e38 if "lora_B" in k else 1.0)
            for k, v in halo.io.load_safetensors(path).items()
        }
        halo.io.save_safetensors(path, sd, {"format": "pt"})
        message = "gives inf/NaN weights"
    model = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(base), adapter)
    assert not torch.isfinite(model.merge_and_unload().model.layers[0].self_attn.q_proj.weight).all()
    res = _cli("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--quiet")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".halo-" in p.name]


# -- the real model (SmolLM2-135M-Instruct, `make model`) ---------------------------------------------


def test_real_model_merge_matches_peft_and_config_checks_pass(smollm2_dir, tmp_path):
    real_model = smollm2_dir
    import peft as peft_lib

    model = T.AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32)
    torch.manual_seed(3)
    config = peft_lib.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    pm = peft_lib.get_peft_model(model, config)
    pm.save_pretrained(tmp_path / "adapter")
    ref = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    summary = halo.merge(real_model, tmp_path / "adapter", tmp_path / "out", progress=False, fsync=False)
    assert summary.merged_modules == 60  # 30 layers x (q_proj, v_proj)
    got = halo.io.load_safetensors(tmp_path / "out" / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.v_proj.weight"):
        want = ref[name].numpy()
        assert np.abs(got[name] - want).max() <= 1e-6 * np.abs(want).max(), name
    assert np.array_equal(got["model.embed_tokens.weight"], ref["model.embed_tokens.weight"].numpy())
    # The nf4 path's config check accepts the real config (210 Linear weights, lm_head tied and skipped)
    # and refuses it with one layer too many.
    merge_module = sys.modules["halo.lora.merge_checkpoint"]
    f = halo.io.open_safetensors(real_model / "model.safetensors")
    shapes = {n: list(f.info(n)[1]) for n in f.names()}
    assert len(merge_module._linear_weights(real_model, {"lm_head"}, shapes)) == 210
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    cfg = json.loads((real_model / "config.json").read_text())
    (hostile / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 31}))
    with pytest.raises(
        ValueError, match="num_hidden_layers = 31, but the checkpoint's tensors hold 30 layers"
    ):
        merge_module._linear_weights(hostile, {"lm_head"}, shapes)


def test_force_replaces_only_a_folder_halo_merged(small, tmp_path):
    """--force used to delete any non-empty --out that held no input (issue 22): now only a folder
    whose .halo-output.json lists every file in it."""
    base, adapter, ref = small
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(
        ValueError, match=r"\[merge\] --force replaces only an output halo wrote: .* has no valid"
    ):
        halo.merge(base, adapter, out, progress=False, force=True)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    (out / "thesis.tex").unlink()
    halo.merge(base, adapter, out, progress=False)
    note = json.loads((out / ".halo-output.json").read_text())
    assert note["writer"] == "halo merge"
    assert sorted(note["files"]) == sorted(p.name for p in out.iterdir() if p.name != ".halo-output.json")
    (out / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match="holds 'notes.md', which halo did not write"):
        halo.merge(base, adapter, out, progress=False, force=True)
    assert (out / "notes.md").read_text() == "mine"
    (out / "notes.md").unlink()
    halo.merge(base, adapter, out, progress=False, force=True)  # halo's own output is replaced
    _assert_close_f32(T.AutoModelForCausalLM.from_pretrained(out).state_dict(), ref)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
