"""Which backend runs halo's kernels: scalar, avx2, avx512 (chosen from the CPU
at run time) or cuda. ``HALO_BACKEND`` pins the choice for ``backend="auto"``."""

from __future__ import annotations

from . import _core

BACKENDS = ("auto", "scalar", "avx2", "avx512", "cuda")


def backends() -> list[str]:
    """Backends this build can run on this machine, e.g. ``['scalar', 'avx2', 'avx512']``."""
    return list(_core.backend.backends())


def kernels() -> dict[str, list[str]]:
    """Every registered kernel table: ``{op: [its entries]}``, each a backend rung or a variant on
    top of one that needs a CPU feature, e.g. ``{'matmul_4bit': ['scalar', 'avx2', 'avx512',
    'avx512-bf16', 'avx512-amx', 'cuda'], ...}``. It lists the tables' entries, not what this
    machine can run: ``halo._core.backend.kernel_variants()`` adds each entry's rung, feature and
    why it cannot run here; :func:`backends` lists the rungs this machine runs."""
    return {op: list(names) for op, names in _core.backend.kernels().items()}


def resolve_backend(backend: str = "auto") -> str:
    """The concrete backend a call with ``backend=`` runs on; raises if it is unavailable."""
    check_backend("resolve_backend", backend)
    return _core.backend.resolve(backend)


def check_backend(function: str, backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"[{function}] backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


BF16_FEATURES = ("amx_bf16", "avx512_bf16")


def native_bf16_features() -> list[str]:
    """The CPU features with which halo's kernels compute bfloat16 natively on the backend
    ``"auto"`` runs on (``HALO_BACKEND`` pins it): a subset of ``["amx_bf16", "avx512_bf16"]``,
    empty on an AVX2-only CPU or when the backend is pinned to avx2 or scalar."""
    rung = _core.backend.resolve("auto")
    variants = _core.backend.kernel_variants().get("matmul_4bit", [])
    return sorted(
        {
            feature
            for _, on, feature, why_not in variants
            if on == rung and feature in BF16_FEATURES and not why_not
        }
    )


def built_with_cuda() -> bool:
    return bool(_core.backend.built_with_cuda())
