"""Run a GGUF file with llama.cpp (through llama-cpp-python, an optional dependency):
what ``make demo`` uses to show an exported model generating.

    >>> from halo.gguf.run import generate
    >>> generate("model-q4_k_m.gguf", "The capital of France is", max_tokens=8)
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["generate", "load_llama"]

_MISSING = "llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36; it builds llama.cpp)"


def load_llama(path: str | os.PathLike, **kwargs: Any):
    """``llama_cpp.Llama`` for ``path`` with llama.cpp's extra (weight-repacking) buffer types off.

    A native llama.cpp build picks the AMX buffer type on AMX-INT8 CPUs, and where the kernel
    does not grant AMX state to its worker threads they die with SIGILL (seen on this project's
    machines for Q4_0 / Q4_1 / Q8_0 weights); the plain CPU buffers compute the same model."""
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as lc
    except ImportError as exc:
        raise ImportError(f"[load_llama] {_MISSING}") from exc
    if not os.path.isfile(path):
        raise ValueError(f"[load_llama] {path} is not a file")
    original = lc.llama_model_default_params

    def without_extra_buffers():
        params = original()
        params.use_extra_bufts = False
        return params

    lc.llama_model_default_params = without_extra_buffers
    try:
        kwargs.setdefault("verbose", False)
        return llama_cpp.Llama(model_path=os.fspath(path), **kwargs)
    finally:
        lc.llama_model_default_params = original


def generate(
    path: str | os.PathLike, prompt: str, max_tokens: int = 32, chat: bool = False, **kwargs: Any
) -> str:
    """Greedy continuation of ``prompt`` by the GGUF model at ``path`` (a chat turn when ``chat``)."""
    llm = load_llama(path, n_ctx=kwargs.pop("n_ctx", 512), **kwargs)
    try:
        if chat:
            out = llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0
            )
            return out["choices"][0]["message"]["content"]
        return llm(prompt, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()
