"""Offline text and perplexity for judging HALO (and its baselines) on causal language models.

``stdlib_docstrings(first, last)`` collects the docstrings of Python's standard-library modules whose
names start with a letter in ``first..last`` (modules in sorted order, each module's docstring then its
classes' and functions' in source order), read from the source files with ``ast`` (nothing is imported,
so no module runs). Calibration text ``a``–``m`` and evaluation text ``n``–``z`` are disjoint by
construction; the selection depends only on the Python installation, which ``corpus_id()`` names.

``token_windows`` cuts a text into non-overlapping windows of ``seq_len`` tokens; ``perplexity`` scores
every window on its own (each predicts its ``seq_len - 1`` next tokens) and returns exp(mean NLL).
"""

from __future__ import annotations

import ast
import math
import os
import sys
import sysconfig
from collections.abc import Iterator
from typing import Any

# Not prose about the library, or not Python modules at all.
EXCLUDED = frozenset(
    {"antigravity", "ensurepip", "idlelib", "lib2to3", "pydoc_data", "test", "this", "tkinter", "turtledemo"}
)


def corpus_id() -> str:
    """Which text ``stdlib_docstrings`` reads: the Python version and its standard-library folder."""
    return f"Python {sys.version.split()[0]} stdlib at {sysconfig.get_paths()['stdlib']}"


def _module_files(stdlib: str, name: str) -> list[str]:
    single = os.path.join(stdlib, name + ".py")
    if os.path.isfile(single):
        return [single]
    package = os.path.join(stdlib, name)
    if not os.path.isfile(os.path.join(package, "__init__.py")):
        return []
    files = []
    for root, folders, names in os.walk(package):
        folders[:] = sorted(f for f in folders if f not in ("test", "tests", "idle_test", "__pycache__"))
        files += [os.path.join(root, n) for n in names if n.endswith(".py")]
    return sorted(files)


def _docstrings(node: ast.AST) -> Iterator[str]:
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        text = ast.get_docstring(node, clean=True)
        if text:
            yield text
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def stdlib_docstrings(first: str = "a", last: str = "z", max_chars: int | None = None) -> str:
    """Docstrings of the standard-library modules whose names start in ``first``..``last``, joined by blank
    lines; stops once ``max_chars`` characters are collected."""
    fn = "stdlib_docstrings"
    for name, letter in (("first", first), ("last", last)):
        if not isinstance(letter, str) or len(letter) != 1 or not letter.islower():
            raise ValueError(f"[{fn}] {name} must be one lower-case letter, got {letter!r}")
    if first > last:
        raise ValueError(f"[{fn}] first {first!r} comes after last {last!r}")
    if max_chars is not None and (
        isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1
    ):
        raise ValueError(f"[{fn}] max_chars must be a positive int or None, got {max_chars!r}")
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(
        n
        for n in sys.stdlib_module_names
        if not n.startswith("_") and n not in EXCLUDED and first <= n[0] <= last
    )
    parts: list[str] = []
    total = 0
    for name in names:
        for path in _module_files(stdlib, name):
            try:
                with open(path, encoding="utf-8") as handle:
                    tree = ast.parse(handle.read())
            except (OSError, SyntaxError, UnicodeDecodeError):
                continue  # a file this interpreter cannot read or parse holds no usable prose
            for text in _docstrings(tree):
                parts.append(text)
                total += len(text) + 2
                if max_chars is not None and total >= max_chars:
                    return "\n\n".join(parts)[:max_chars]
    return "\n\n".join(parts)


def token_windows(tokenizer: Any, text: str, seq_len: int = 512, count: int | None = None) -> Any:
    """A (windows, seq_len) int64 torch tensor of consecutive non-overlapping token windows of ``text``."""
    import torch

    fn = "token_windows"
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"[{fn}] seq_len must be an int >= 2, got {seq_len!r}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    available = len(ids) // seq_len
    if count is None:
        count = available
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"[{fn}] count must be a positive int or None, got {count!r}")
    if count > available:
        raise ValueError(
            f"[{fn}] the text holds {len(ids)} tokens: {available} windows of {seq_len}, {count} asked for"
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.int64).reshape(count, seq_len)


def perplexity(model: Any, windows: Any, batch_size: int = 4) -> tuple[float, float, int]:
    """(perplexity, total negative log-likelihood in nats, predicted tokens) of a causal LM over windows."""
    import torch

    fn = "perplexity"
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"[{fn}] windows must be a (n, seq_len >= 2) token tensor, got {windows!r:.80}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"[{fn}] batch_size must be a positive int, got {batch_size!r}")
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size]
                logits = model(batch).logits[:, :-1].float()
                targets = batch[:, 1:]
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
                total += float(nll)
                tokens += targets.numel()
    finally:
        model.train(was_training)
    return math.exp(total / tokens), total, tokens
