"""Writes gguf_golden.npz: seeded inputs and the bytes llama.cpp's own quantizer
(libggml-base from llama-cpp-python==0.3.36, no importance matrix) gives for
them, so the default test suite checks halo's K-quants against llama.cpp
without building it.

    PYTHONPATH=tests/python .venv/bin/python tests/python/data/make_gguf_golden.py
"""

from __future__ import annotations

from pathlib import Path

import gguf_ggml
import numpy as np

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16")
N = 4 * 256  # four super-blocks per case


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261127)
    normal = rng.standard_normal(N)
    return {
        "normal": normal,
        "heavy_tailed": rng.standard_t(2, N) * 0.02,
        "positive": np.abs(normal) + 0.1,
        "negative": -np.abs(rng.standard_normal(N)),
        "sparse": normal * (rng.random(N) < 0.05),
        "tiny": normal * 1e-20,
        "huge": normal * 1e20,
        "constant": np.full(N, -0.3125),
        "integers": rng.integers(-9, 9, N).astype(np.float64),
        "zeros": np.zeros(N),
        "with_nan": np.where(rng.random(N) < 0.002, np.nan, normal),
        "weights_like": rng.standard_normal(N) * 0.02 * (1 + 4 * (rng.random(N) < 0.01)),
    }


def main() -> None:
    out: dict[str, np.ndarray] = {}
    for name, x in inputs().items():
        x = x.astype(np.float32)
        out[f"input/{name}"] = x
        for t in TYPES:
            out[f"{t}/{name}"] = gguf_ggml.quantize(x, t, n_per_row=256)
    path = Path(__file__).with_name("gguf_golden.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(out)} arrays)")


if __name__ == "__main__":
    main()
