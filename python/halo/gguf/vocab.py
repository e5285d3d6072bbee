"""Tokenizer metadata between a Hugging Face folder and GGUF, for byte-level BPE
("gpt2") tokenizers: LLaMA 3, SmolLM, Qwen2, Mistral Nemo and the like.

Export (``export_metadata``) reads ``tokenizer.json``, ``tokenizer_config.json``,
``config.json`` and ``chat_template.jinja`` / ``chat_template.json`` and gives
the ``tokenizer.*`` keys llama.cpp reads: the token list with token types, the
merges, the pre-tokenizer name, special token ids, whether BOS/EOS are added, and
the chat template. The pre-tokenizer name comes from the same fingerprint
llama.cpp's converter uses (the token ids of a fixed probe text, hashed), computed
with the ``tokenizers`` library; a tokenizer whose fingerprint is unknown is
recognized from the shape of its pre-tokenizer, or named with ``pre_tokenizer=``.

Import (``hf_tokenizer_files``) builds ``tokenizer.json`` and
``tokenizer_config.json`` from a GGUF file's keys, without transformers.
SentencePiece ("llama") vocabularies are not handled: both directions raise a
clear ValueError for them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

__all__ = ["export_metadata", "hf_tokenizer_files"]

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# The probe text of llama.cpp's pre-tokenizer fingerprint (convert_hf_to_gguf's chktxt).
_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# Fingerprints (sha256 of str(token ids of _PROBE)) of the families this export targets, as
# listed by llama.cpp's converter, and the pre-tokenizer names llama.cpp gives them.
_KNOWN_FINGERPRINTS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 embedding
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_SPECIAL_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",  # sic: llama.cpp's key
    "pad": "tokenizer.ggml.padding_token_id",
    "cls": "tokenizer.ggml.cls_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
}


def _fail(msg: str) -> None:
    raise ValueError(f"[export_gguf] {msg}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        _fail(f"{path} is not valid JSON: {exc}")


def _looks_special(token: str) -> bool:
    # Added tokens some models forget to mark special (as llama.cpp's converter treats them).
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _pre_from_structure(pre: dict | None) -> str | None:
    """The llama.cpp pre-tokenizer a tokenizer.json pre_tokenizer block amounts to, if recognizable."""
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps if isinstance(s, dict)]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern == _LLAMA3_REGEX:
            return "llama-bpe"
        if pattern == _QWEN2_REGEX:
            return "qwen2"
    return None


def _fingerprint(tokenizer_json: Path) -> str | None:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    ids = Tokenizer.from_file(str(tokenizer_json)).encode(_PROBE).ids
    return hashlib.sha256(str(ids).encode()).hexdigest()


def _merges(model: dict) -> list[str]:
    merges = model.get("merges") or []
    if not merges:
        return []
    if isinstance(merges[0], str):
        return list(merges)
    out = []
    escaped = chr(ord(" ") + 256)
    for pair in merges:
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], str)
        ):
            _fail(f"tokenizer.json has a merge entry {pair!r}; expected 'a b' strings or [a, b] pairs")
        a, b = pair
        # A literal space inside a merge part becomes U+0120 ('Ġ', space + 256), as llama.cpp's converter writes it.
        if " " in a or " " in b:
            a, b = a.replace(" ", escaped), b.replace(" ", escaped)
        out.append(f"{a} {b}")
    return out


def _chat_template(folder: Path, tok_config: dict) -> Any:
    alt = None
    jinja, cjson = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja.is_file():
        alt = jinja.read_text(encoding="utf-8")
    elif cjson.is_file():
        alt = _read_json(cjson).get("chat_template")
    template = tok_config.get("chat_template", alt)
    return template if isinstance(template, (str, list)) else None


def export_metadata(
    folder: str | Path, vocab_size: int, pre_tokenizer: str | None = None
) -> list[tuple[str, str, Any]]:
    """``tokenizer.*`` GGUF key/values (key, GGUF type, value) for the tokenizer in ``folder``."""
    folder = Path(folder)
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        if (folder / "tokenizer.model").is_file():
            _fail(
                f"{folder} has only a SentencePiece tokenizer.model; only byte-level BPE tokenizer.json is supported"
            )
        _fail(f"{folder} has no tokenizer.json")
    tj = _read_json(tj_path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        _fail(
            f"{tj_path}: tokenizer model {model.get('type')!r} (byte_fallback={model.get('byte_fallback')}) is not "
            "a byte-level BPE; only GPT-2-style BPE tokenizers are supported"
        )
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        _fail(f"{tj_path} has no BPE vocab")
    tok_config = (
        _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    )
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    added = [a for a in tj.get("added_tokens", []) if isinstance(a, dict)]

    by_id: dict[int, str] = {}
    for text, i in vocab.items():
        by_id[int(i)] = text
    added_by_id = {int(a["id"]): a for a in added if "id" in a and "content" in a}
    for i, a in added_by_id.items():
        by_id[i] = a["content"]
    if max(by_id) >= vocab_size:
        _fail(f"tokenizer has token id {max(by_id)}, but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        text = by_id[i]
        if i in added_by_id:
            a = added_by_id[i]
            if a.get("special") or _looks_special(text):
                types.append(CONTROL)
            else:
                text = text.replace("\u2581", " ")  # llama.cpp expects user-defined tokens pre-normalized
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(text)

    pre = pre_tokenizer
    if pre is None:
        fingerprint = _fingerprint(tj_path)
        pre = _KNOWN_FINGERPRINTS.get(fingerprint or "") or _pre_from_structure(tj.get("pre_tokenizer"))
    if pre is None:
        _fail(
            f"{tj_path}: the pre-tokenizer is not one halo recognizes (llama-bpe, smollm, qwen2, gpt-2); "
            "name it with pre_tokenizer= / --pre-tokenizer"
        )

    out: list[tuple[str, str, Any]] = [
        ("tokenizer.ggml.model", "string", "gpt2"),
        ("tokenizer.ggml.pre", "string", pre),
        ("tokenizer.ggml.tokens", "array[string]", tokens),
        ("tokenizer.ggml.token_type", "array[int32]", types),
    ]
    merges = _merges(model)
    if merges:
        out.append(("tokenizer.ggml.merges", "array[string]", merges))

    # Special token ids: tokenizer_config's token text looked up in added_tokens first, then config.json ids.
    special: dict[str, int] = {}
    for typ in _SPECIAL_TYPES:
        entry = tok_config.get(f"{typ}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str):
            tid = next((int(a["id"]) for a in added if a.get("content") == content), None)
            if tid is not None and 0 <= tid < vocab_size:
                special.setdefault(typ, tid)
    for typ in _SPECIAL_TYPES:
        tid = config.get(
            f"{typ}_token_id"
        )  # a list (several EOS ids) is ignored, as llama.cpp's converter does
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < vocab_size:
            special.setdefault(typ, tid)
    for typ, tid in special.items():
        out.append((_SPECIAL_KEYS[typ], "uint32", tid))

    add_bos, add_eos = _added_special_tokens(tj, tok_config, special, by_id)
    out.append(("tokenizer.ggml.add_bos_token", "bool", add_bos))
    if add_eos is not None:
        out.append(("tokenizer.ggml.add_eos_token", "bool", add_eos))

    template = _chat_template(folder, tok_config)
    if isinstance(template, str):
        out.append(("tokenizer.chat_template", "string", template))
    elif isinstance(template, list):
        for item in template:
            if isinstance(item, dict) and isinstance(item.get("template"), str):
                name = item.get("name", "default")
                key = "tokenizer.chat_template" if name == "default" else f"tokenizer.chat_template.{name}"
                out.append((key, "string", item["template"]))
    return out


def _added_special_tokens(
    tj: dict, tok_config: dict, special: dict[str, int], by_id: dict[int, str]
) -> tuple[bool, bool | None]:
    """(add BOS, add EOS or None when unknown) as the Hugging Face tokenizer does it."""
    add_bos = tok_config.get("add_bos_token")
    add_eos = tok_config.get("add_eos_token")
    post = tj.get("post_processor") or {}
    for proc in post.get("processors", [post]) if isinstance(post, dict) else []:
        if not isinstance(proc, dict) or proc.get("type") != "TemplateProcessing":
            continue
        single = proc.get("single") or []
        first = (
            single[0].get("SpecialToken", {}).get("id") if single and isinstance(single[0], dict) else None
        )
        last = (
            single[-1].get("SpecialToken", {}).get("id") if single and isinstance(single[-1], dict) else None
        )
        bos_text = by_id.get(special.get("bos", -1))
        eos_text = by_id.get(special.get("eos", -1))
        if not isinstance(add_bos, bool):
            add_bos = first is not None and first == bos_text
        if not isinstance(add_eos, bool) and len(single) > 1:
            add_eos = last is not None and last == eos_text
    return (add_bos if isinstance(add_bos, bool) else False), (add_eos if isinstance(add_eos, bool) else None)


# ---------------------------------------------------------------- import


def _pre_tokenizer_json(pre: str) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre in ("gpt-2", "gpt2", "default", "mpt", "olmo", "starcoder", "refact", "codeshell"):
        return byte_level
    if pre in ("smollm", "exaone"):
        return {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
        }
    regex = {"llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}.get(pre)
    if regex is None:
        raise ValueError(
            f"[import_gguf] pre-tokenizer {pre!r} has no Hugging Face equivalent in halo "
            "(known: gpt-2, smollm, llama-bpe, qwen2)"
        )
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False},
        ],
    }


def hf_tokenizer_files(meta: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer.json`` and ``tokenizer_config.json`` contents for a GGUF file's metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"[import_gguf] tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2' vocabularies)"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type")
    if not isinstance(tokens, list) or types is None or len(types) != len(tokens):
        raise ValueError(
            "[import_gguf] tokenizer.ggml.tokens / token_type are missing or of different lengths"
        )
    merges_raw = meta.get("tokenizer.ggml.merges") or []
    # Byte-level vocabularies spell a space as U+0120 ('Ġ') already, so merge parts need no unescaping.
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"[import_gguf] merge {m!r} is not two space-separated parts")
        merges.append(parts)
    pre = meta.get("tokenizer.ggml.pre", "default")
    vocab = {}
    added = []
    for i, (text, typ) in enumerate(zip(tokens, (int(t) for t in types))):
        if typ == UNUSED and re.fullmatch(r"\[PAD\d+\]", text):
            continue
        vocab.setdefault(text, i)
        if typ in (CONTROL, USER_DEFINED):
            added.append(
                {
                    "id": i,
                    "content": text,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": typ == USER_DEFINED,
                    "special": typ == CONTROL,
                }
            )

    def token_text(key: str) -> str | None:
        tid = meta.get(key)
        return tokens[tid] if isinstance(tid, int) and 0 <= tid < len(tokens) else None

    bos, eos = token_text(_SPECIAL_KEYS["bos"]), token_text(_SPECIAL_KEYS["eos"])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single: list[dict] = [{"Sequence": {"id": "A", "type_id": 0}}]
    pair: list[dict] = [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]
    specials: dict[str, Any] = {}
    for on, text, at_end in ((add_bos, bos, False), (add_eos, eos, True)):
        if on:
            entry = {"SpecialToken": {"id": text, "type_id": 0}}
            single = [*single, entry] if at_end else [entry, *single]
            pair = [*pair, entry] if at_end else [entry, *pair]
            specials[text] = {"id": text, "ids": [tokens.index(text)], "tokens": [text]}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer_json(pre),
        "post_processor": {
            "type": "TemplateProcessing",
            "single": single,
            "pair": pair,
            "special_tokens": specials,
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length", 2048)),
    }
    for typ in ("bos", "eos", "unk", "pad", "sep", "cls", "mask"):
        text = token_text(_SPECIAL_KEYS[typ])
        if text is not None:
            config[f"{typ}_token"] = text
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config}
