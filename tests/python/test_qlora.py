"""halo.hf.qlora, the recipe runner of examples/qlora.yaml: ``compute_dtype="auto"`` (which dtype on
which machine, explicit dtypes obeyed) and the Trainer path end to end on a tiny LLaMA."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import halo.backend  # noqa: E402
import halo.hf.quantizer as hf_4bit  # noqa: E402
from halo.hf.qlora import load_model, load_recipe, make_dataset, resolve_dtypes, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "qlora.yaml"


@pytest.mark.parametrize(
    ("features", "cuda", "expected"),
    [
        (["amx_bf16", "avx512_bf16"], False, torch.bfloat16),  # Sapphire Rapids and later
        (["avx512_bf16"], False, torch.bfloat16),  # Cooper Lake, Zen 4
        (["amx_bf16"], False, torch.bfloat16),
        ([], False, torch.float32),  # AVX2 only (Zen 2/3, Haswell ... Ice Lake)
        (["avx2", "avx512"], False, torch.float32),  # AVX-512 without BF16 (Skylake-SP)
        ([], True, torch.bfloat16),  # a GPU with bfloat16
    ],
)
def test_auto_compute_dtype_follows_the_machine(features, cuda, expected):
    dtype, why = hf_4bit.auto_compute_dtype(features, cuda=cuda)
    assert dtype == expected
    assert why


def _mock_machine(monkeypatch, features):
    """The machine as halo sees it: these native-bf16 CPU features and no CUDA device."""
    monkeypatch.setattr(halo.backend, "native_bf16_features", lambda: list(features))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hf_4bit, "_NOTICED", set())


@pytest.mark.parametrize(("features", "expected"), [([], torch.float32), (["amx_bf16"], torch.bfloat16)])
def test_halo_config_auto_asks_the_cpu_and_says_so_once(monkeypatch, capsys, features, expected):
    _mock_machine(monkeypatch, features)
    assert hf_4bit.HaloConfig(compute_dtype="auto").compute_dtype == expected
    assert (
        hf_4bit.HaloConfig.from_bnb({"load_in_4bit": True, "bnb_4bit_compute_dtype": "auto"}).compute_dtype
        == expected
    )
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "compute_dtype='auto' -> " + str(expected).removeprefix("torch.") in lines[0]


@pytest.mark.parametrize("features", [[], ["amx_bf16", "avx512_bf16"]])
@pytest.mark.parametrize("explicit", [torch.float32, torch.bfloat16, torch.float16, "float32", "bfloat16"])
def test_an_explicit_compute_dtype_is_obeyed(monkeypatch, capsys, features, explicit):
    _mock_machine(monkeypatch, features)
    want = explicit if isinstance(explicit, torch.dtype) else getattr(torch, explicit)
    assert hf_4bit.HaloConfig(compute_dtype=explicit).compute_dtype == want
    recipe = {"quantization": {"bnb_4bit_compute_dtype": explicit}, "training": {"bf16": False}}
    assert resolve_dtypes(recipe) == recipe
    assert capsys.readouterr().err == ""  # no notice when nothing was chosen for the user


@pytest.mark.parametrize(
    ("features", "dtype", "bf16"), [([], "float32", False), (["avx512_bf16"], "bfloat16", True)]
)
def test_the_example_recipe_resolves_auto_for_both_libraries(monkeypatch, features, dtype, bf16):
    _mock_machine(monkeypatch, features)
    recipe = load_recipe(RECIPE)
    assert recipe["quantization"]["bnb_4bit_compute_dtype"] == "auto" and recipe["training"]["bf16"] == "auto"
    resolved = resolve_dtypes(recipe)
    assert resolved["quantization"]["bnb_4bit_compute_dtype"] == dtype
    assert resolved["training"]["bf16"] is bf16
    assert recipe["training"]["bf16"] == "auto"  # the caller's recipe is left as it was


def _in_child(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_auto_on_a_backend_pinned_to_avx2_is_float32():
    """No mock: halo's kernels pinned to AVX2 (HALO_BACKEND=avx2, an AVX2-only CPU's path) report no
    native bfloat16, and "auto" chooses float32 with one line saying why."""
    code = (
        "import halo.backend, halo.hf.quantizer as h\n"
        "print(halo.backend.native_bf16_features(), h.HaloConfig(compute_dtype='auto').compute_dtype)"
    )
    pinned = _in_child(code, HALO_BACKEND="avx2")
    assert pinned.returncode == 0, pinned.stderr[-2000:]
    assert pinned.stdout.split() == ["[]", "torch.float32"]
    assert "compute_dtype='auto' -> float32: this CPU has no native bfloat16" in pinned.stderr
    free = _in_child(code, HALO_BACKEND="auto")
    assert free.returncode == 0, free.stderr[-2000:]
    native = halo.backend.native_bf16_features()
    assert free.stdout.strip().endswith("torch.bfloat16" if native else "torch.float32")


@pytest.fixture(scope="module")
def tiny_chat_llama(tmp_path_factory, smollm2_dir):
    """A 2-layer LLaMA (hidden 64) with SmolLM2's vocabulary and tokenizer, saved: the recipe's
    chat data tokenizes as on SmolLM2 and a training step takes a fraction of a second."""
    import tiny_models

    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    tiny_models.llama(seed=0, vocab_size=49152, max_position_embeddings=256).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, folder / name)
    return folder


@pytest.mark.parametrize("machine", ["avx2-only", "this machine"])
def test_the_recipe_trains_through_the_trainer(monkeypatch, tiny_chat_llama, tmp_path, machine):
    """examples/qlora.yaml as halo.hf.qlora runs it (compute_dtype and bf16 "auto", HaloConfig, PEFT
    with halo's LoRA layer, gradient checkpointing, halo's paged 8-bit AdamW, cosine schedule,
    transformers' Trainer): the layers compute in the dtype "auto" chose, every step logs a finite
    loss, every adapter tensor takes an optimizer step, the base stays 4-bit."""
    from halo.nn import Linear4bit

    if machine == "avx2-only":
        _mock_machine(monkeypatch, [])
    recipe = load_recipe(RECIPE)
    recipe["model"] = str(tiny_chat_llama)
    model, tokenizer = load_model(recipe, "halo", lora_dropout=0.0, seed=0)
    want = resolve_dtypes(recipe)["quantization"]["bnb_4bit_compute_dtype"]
    if machine == "avx2-only":
        assert want == "float32"
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and all(str(m.compute_dtype) == f"torch.{want}" for m in layers)
    data = make_dataset(tokenizer, ROOT / recipe["data"], max_length=96, pad_to=96)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    steps = 3
    run = train(
        model,
        data,
        recipe,
        "halo",
        max_steps=steps,
        logging_steps=1,
        warmup_steps=1,
        learning_rate=1e-3,
        output_dir=str(tmp_path / "run"),
        disable_tqdm=True,
    )
    assert len(run.losses) == steps and len(run.step_seconds) == steps
    assert all(math.isfinite(x) and x > 0 for x in run.losses)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in moved) and any("lora_A" in n for n in moved)
    assert len(moved) == len(before)  # every adapter tensor took an optimizer step
    assert all(m.weight.dtype == torch.uint8 for m in layers)


def test_the_example_script_trains_saves_and_merges(tiny_chat_llama, tmp_path):
    """examples/qlora_finetune.py as a user runs it, on examples/qlora.yaml with the model, the
    step count and the output folders pointed at a tiny LLaMA and tmp_path: it trains, saves a PEFT
    adapter and merges it with `halo merge` into a model transformers loads."""
    import yaml

    recipe = load_recipe(RECIPE)
    recipe["model"] = str(tiny_chat_llama)
    recipe["data"] = str(ROOT / recipe["data"])
    recipe["max_seq_length"] = 64
    recipe["training"].update(output_dir=str(tmp_path / "run"), max_steps=2, logging_steps=1, warmup_steps=1)
    recipe["merge"].update(adapter=str(tmp_path / "adapter"), out=str(tmp_path / "merged"))
    config = tmp_path / "qlora.yaml"
    config.write_text(yaml.safe_dump(recipe))
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "qlora_finetune.py"), "--config", str(config)],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 2 steps" in result.stdout
    assert "compute_dtype='auto' -> " in result.stderr  # the one-line notice
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.num_hidden_layers == 2


def test_a_saved_auto_config_chooses_again_where_it_is_loaded(monkeypatch):
    """HaloConfig(compute_dtype="auto") saves "auto", so the model saved on an AMX machine computes in
    float32 when loaded on an AVX2-only one; an explicit dtype (or one set later) is saved as it is."""
    _mock_machine(monkeypatch, ["amx_bf16"])
    config = hf_4bit.HaloConfig(compute_dtype="auto")
    assert config.compute_dtype == torch.bfloat16 and config.to_dict()["compute_dtype"] == "auto"
    _mock_machine(monkeypatch, [])
    assert hf_4bit.HaloConfig(**config.to_dict()).compute_dtype == torch.float32
    assert hf_4bit.HaloConfig(compute_dtype="bfloat16").to_dict()["compute_dtype"] == "bfloat16"
    config.compute_dtype = torch.float16
    assert config.to_dict()["compute_dtype"] == "float16"
