"""Metadata against tensors, before a byte is written: the GGUF tensors (names and shapes,
torch order) that a LLaMA / Mistral / Qwen2 model of given hyperparameters holds, and one
check that a file (import) or a folder's weights (export) hold exactly those.

llama.cpp itself refuses a file whose tensors do not match its metadata when it loads
it; transformers does not (a missing layer is filled with random weights, with a
warning), so both directions are checked here: export against config.json, import
against the GGUF keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .arch import ModelSpec

__all__ = ["OUTPUT_KEY", "check_tensors", "expected_shapes"]

# The mark in every GGUF halo writes (the command that wrote it): what --force may replace.
OUTPUT_KEY = "halo.output"

Shape = tuple[int, ...]


def expected_shapes(spec: ModelSpec, qkv_bias: bool) -> tuple[dict[str, Shape], set[str]]:
    """(every tensor's torch-order shape by GGUF name, the names that may be absent)."""
    e, ff, vocab = spec.n_embd, spec.n_ff, spec.vocab_size
    head = spec.head_dim or e // spec.n_head
    q, kv = spec.n_head * head, spec.n_head_kv * head
    shapes: dict[str, Shape] = {
        "token_embd.weight": (vocab, e),
        "output_norm.weight": (e,),
        "output.weight": (vocab, e),
        "rope_freqs.weight": (spec.rope_dim // 2,),
    }
    optional = {"rope_freqs.weight"} | ({"output.weight"} if spec.tied else set())
    for i in range(spec.n_layer):
        b = f"blk.{i}."
        shapes.update(
            {
                b + "attn_norm.weight": (e,),
                b + "ffn_norm.weight": (e,),
                b + "attn_q.weight": (q, e),
                b + "attn_k.weight": (kv, e),
                b + "attn_v.weight": (kv, e),
                b + "attn_output.weight": (e, q),
                b + "ffn_gate.weight": (ff, e),
                b + "ffn_up.weight": (ff, e),
                b + "ffn_down.weight": (e, ff),
            }
        )
        if qkv_bias:
            shapes.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
    return shapes, optional


def check_tensors(
    fn: str,
    holder: str,
    described_by: str,
    expected: tuple[dict[str, Shape], set[str]],
    actual: dict[str, Shape],
) -> None:
    """ValueError naming the first disagreement (and how many there are) between the tensors
    `holder` holds (``actual``: name -> torch-order shape) and what `described_by` implies."""
    shapes, optional = expected
    problems = []
    for name, want in shapes.items():
        got = actual.get(name)
        if got is None:
            if name not in optional:
                problems.append(f"{described_by} needs tensor {name!r}, which {holder} lack")
        elif tuple(got) != want:
            problems.append(
                f"{holder} hold {name!r} of shape {list(got)}, {described_by} implies {list(want)}"
            )
    for name in actual:
        if name not in shapes:
            problems.append(f"{holder} hold {name!r}, which {described_by} does not describe")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"[{fn}] {problems[0]}{more}; nothing was written")
