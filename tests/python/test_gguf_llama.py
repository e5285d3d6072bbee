"""GGUF against llama.cpp itself (llama-cpp-python==0.3.36, an optional test group: it builds
llama.cpp from source, which takes about half an hour on two cores). Every test here skips
when it is not installed; `pytest -m llama_cpp` runs only these.

- ggml's own quantizer (libggml-base through ctypes) on random inputs: the same bytes;
- llama_model_quantize on a halo f32 export vs halo's direct export: the same file, byte
  for byte, for every file type, on a tiny model and on SmolLM2;
- llama.cpp loads halo's exports of SmolLM2, tokenizes as the Hugging Face tokenizer does and
  predicts the next token as the Hugging Face model does;
- a LoRA adapter exported with --adapter gives llama.cpp the logits of PEFT's merged model.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import halo
import numpy as np
import pytest
from halo import gguf as hg
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import gguf_fixtures as fx
import gguf_ggml
import tiny_models

pytestmark = [
    pytest.mark.llama_cpp,
    pytest.mark.skipif(not gguf_ggml.available(), reason=gguf_ggml.SKIP_REASON),
]
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16")
FTYPES = {
    "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9,
    "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
}  # fmt: skip
EVAL_TOKENS = 256


def llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@settings(max_examples=40, deadline=None)
@given(
    qtype=st.sampled_from(TYPES),
    blocks=st.integers(1, 9),
    scale=st.sampled_from([1e-30, 1e-6, 0.02, 1.0, 300.0, 1e25]),
    shape=st.sampled_from(["normal", "uniform", "student", "sparse", "lattice", "offset"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantizers_give_ggml_bytes(qtype, blocks, scale, shape, seed):
    rng = np.random.default_rng(seed)
    n = blocks * 256
    x = {
        "normal": lambda: rng.standard_normal(n),
        "uniform": lambda: rng.uniform(-1, 1, n),
        "student": lambda: rng.standard_t(1.5, n),
        "sparse": lambda: rng.standard_normal(n) * (rng.random(n) < 0.03),
        "lattice": lambda: rng.integers(-16, 16, n) / 4.0,
        "offset": lambda: rng.standard_normal(n) + 5.0,
    }[shape]()
    x = (x * scale).astype(np.float32)
    want = gguf_ggml.quantize(x, qtype, n_per_row=256)
    simd = ("Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K")
    backends = [b for b in halo.backends() if b != "cuda"] if qtype in simd else ["auto"]
    for backend in backends:
        assert np.array_equal(hg.quantize(x.reshape(-1, 256), qtype, backend=backend).reshape(-1), want), (
            backend
        )
    if qtype not in ("F16", "BF16"):
        ref = gguf_ggml.dequantize(want, qtype, n)
        got = hg.dequantize(want, qtype, (n,))
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    work = tmp_path_factory.mktemp("llama")
    model = fx.tiny_model(work / "m")
    halo.export_gguf(model, work / "f32.gguf", type="f32", progress=False, name="tiny")
    return model, work


@pytest.mark.parametrize("file_type", sorted(FTYPES))
def test_direct_export_is_llama_quantize_of_the_f32_export(tiny_f32, file_type):
    model, work = tiny_f32
    ours, theirs = work / f"halo-{file_type}.gguf", work / f"llama-{file_type}.gguf"
    halo.export_gguf(model, ours, type=file_type, progress=False, name="tiny", force=True)
    llama_quantize(work / "f32.gguf", theirs, FTYPES[file_type])
    assert ours.read_bytes() == theirs.read_bytes()


def test_smollm2_q4_k_m_is_byte_identical_to_llama_quantize(tmp_path):
    folder = fx.smol_folder()
    halo.export_gguf(folder, tmp_path / "f32.gguf", type="f32", progress=False)
    halo.export_gguf(folder, tmp_path / "halo.gguf", type="q4_k_m", progress=False)
    llama_quantize(tmp_path / "f32.gguf", tmp_path / "llama.gguf", FTYPES["q4_k_m"])
    (tmp_path / "f32.gguf").unlink()
    assert (tmp_path / "halo.gguf").read_bytes() == (tmp_path / "llama.gguf").read_bytes()


def _eval_text() -> str:
    """English prose from the standard library (the docstrings of modules n-z, in sorted order)."""
    import importlib

    texts = []
    for name in (
        "operator",
        "pathlib",
        "pickle",
        "queue",
        "random",
        "shutil",
        "statistics",
        "string",
        "textwrap",
    ):
        mod = importlib.import_module(name)
        texts.append(mod.__doc__ or "")
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            doc = getattr(obj, "__doc__", None)
            if callable(obj) and isinstance(doc, str) and getattr(obj, "__module__", None) == name:
                texts.append(doc)
    return "\n\n".join(texts)


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = gguf_ggml.load_llama(path, n_ctx=512, logits_all=True, n_threads=2)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    z = logits[:-1].astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


@pytest.fixture(scope="module")
def smollm2_reference():
    import torch
    import transformers as T

    folder = fx.smol_folder()
    tok = T.AutoTokenizer.from_pretrained(folder)
    text = _eval_text()
    ids = tok(text)["input_ids"][:EVAL_TOKENS]
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    return folder, text, ids, logits


@pytest.mark.parametrize(
    ("file_type", "min_agree", "max_ppl_ratio"), [("f16", 0.98, 1.01), ("q4_k_m", 0.75, 1.15)]
)
def test_llama_cpp_runs_halo_exports_like_the_hf_model(
    tmp_path, smollm2_reference, file_type, min_agree, max_ppl_ratio
):
    folder, text, ids, hf_logits = smollm2_reference
    path = tmp_path / f"smol-{file_type}.gguf"
    halo.export_gguf(folder, path, type=file_type, progress=False)
    llm = gguf_ggml.load_llama(path, n_ctx=512, n_threads=2)
    assert llm.tokenize(text.encode(), add_bos=False)[:EVAL_TOKENS] == ids  # vocab, merges, pre-tokenizer
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    assert (
        llm.tokenize(chat.encode(), add_bos=False, special=True)[0] == 1
    )  # <|im_start|> is one special token
    llm.close()
    from halo.gguf.run import generate

    out = generate(path, "The capital of France is", max_tokens=8)
    assert out.strip(), "llama.cpp generated nothing"
    assert generate(path, "What is 2 + 2?", max_tokens=8, chat=True).strip()
    logits = _llama_logits(path, ids)
    agree = float((logits.argmax(1) == hf_logits.argmax(1)).mean())
    ratio = _perplexity(logits, ids) / _perplexity(hf_logits, ids)
    assert agree >= min_agree, f"next-token agreement {agree:.3f}"
    assert ratio <= max_ppl_ratio, f"perplexity ratio {ratio:.3f}"


def test_adapter_export_gives_llama_cpp_the_merged_models_logits(tmp_path, smollm2_reference):
    """--adapter in one pass vs PEFT's merge_and_unload saved and exported: llama.cpp's logits agree
    (f32 files, so only the merge arithmetic differs)."""
    folder, _, ids, _ = smollm2_reference
    adapter, merged = tiny_models.make_adapter(folder, "plain", tmp_path / "adapter")
    from safetensors.torch import save_file

    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    save_file(
        {k: v.contiguous() for k, v in merged.items() if k != "lm_head.weight"},
        merged_dir / "model.safetensors",
    )
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (merged_dir / f.name).write_bytes(f.read_bytes())
    halo.export_gguf(folder, tmp_path / "base.gguf", type="f16", progress=False)
    halo.export_gguf(folder, tmp_path / "one_pass.gguf", type="f16", adapter=adapter, progress=False)
    halo.export_gguf(merged_dir, tmp_path / "peft.gguf", type="f16", progress=False)
    base = _llama_logits(tmp_path / "base.gguf", ids)
    a = _llama_logits(tmp_path / "one_pass.gguf", ids)
    b = _llama_logits(tmp_path / "peft.gguf", ids)
    scale = float(np.abs(b).max())
    assert np.abs(a - base).max() > 0.1 * scale  # the adapter changes the model
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99
    assert np.abs(a - b).max() <= 0.01 * scale
