"""Backend policy: listing, pinning with HALO_BACKEND / backend=, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import halo
import numpy as np
import pytest


def test_backends_lists_scalar_and_what_the_cpu_has():
    names = halo.backends()
    assert names[0] == "scalar"
    with open("/proc/cpuinfo") as cpuinfo:
        flags = cpuinfo.read()
    assert ("avx512bw" in flags) == ("avx512" in names)
    assert ("avx2" in flags) == ("avx2" in names)


def test_auto_picks_the_best_cpu_backend():
    best = [b for b in halo.backends() if b != "cuda"][-1]
    env = {k: v for k, v in os.environ.items() if k != "HALO_BACKEND"}
    code = "import halo; print(halo.resolve_backend('auto'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == best


def test_env_override_pins_the_backend():
    code = "import halo; print(halo.resolve_backend('auto'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "HALO_BACKEND": "scalar"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "scalar"
    bad = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "HALO_BACKEND": "tpu"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "tpu" in bad.stderr


def test_every_backend_gives_the_same_bytes():
    w = np.random.default_rng(0).standard_normal((33, 65)).astype(np.float32)
    results = [halo.quantize_4bit(w, backend=b) for b in halo.backends()]
    for r in results[1:]:
        assert np.array_equal(r.packed, results[0].packed)
        assert np.array_equal(r.absmax, results[0].absmax)


def test_unavailable_backend_raises_a_clear_error():
    if "cuda" in halo.backends():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="cuda"):
        halo.quantize_4bit(np.ones(64, np.float32), backend="cuda")


def test_kernels_lists_each_op_and_its_backends():
    kernels = halo.kernels()
    assert kernels == halo._core.backend.kernels()
    rungs = {"scalar", "avx2", "avx512", "cuda"}
    details = halo._core.backend.kernel_variants()
    assert set(details) == set(kernels)
    for op in ("matmul_4bit", "matmul_4bit_transposed", "quantize_4bit", "dequantize_4bit"):
        assert "scalar" in kernels[op], op
        # every entry is a rung, or a variant on top of one that names its CPU feature
        for variant, backend, feature, _why in details[op]:
            assert backend in rungs and variant in kernels[op], (op, variant)
            assert (variant == backend and feature == "") or (
                variant.startswith(backend + "-") and feature
            ), variant
    # the AMX / AVX512-BF16 matmuls and the CUDA device-pointer kernels are registry entries
    assert {"avx512-bf16", "avx512-amx"} <= set(kernels["matmul_4bit"])
    assert kernels["quantize_4bit_device"] == ["cuda"]
    available = {v for v, _b, _f, why in details["matmul_4bit"] if not why}
    assert set(halo.backends()) - {"cuda"} <= available
    assert "kernels" in halo.__all__
