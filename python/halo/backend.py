"""Which backend runs halo's kernels: scalar, avx2, avx512 (chosen from the CPU
at run time) or cuda. ``HALO_BACKEND`` pins the choice for ``backend="auto"``."""

from __future__ import annotations

from . import _core

BACKENDS = ("auto", "scalar", "avx2", "avx512", "cuda")


def backends() -> list[str]:
    """Backends this build can run on this machine, e.g. ``['scalar', 'avx2', 'avx512']``."""
    return list(_core.backend.backends())


def kernels() -> dict[str, list[str]]:
    """Every registered kernel table: ``{op: [backends it has a kernel for]}``, e.g.
    ``{'matmul_4bit': ['scalar', 'avx2', 'avx512', 'cuda'], ...}``. It lists the kernel tables'
    entries, not what this machine can run: see :func:`backends` for that."""
    return {op: list(names) for op, names in _core.backend.kernels().items()}


def resolve_backend(backend: str = "auto") -> str:
    """The concrete backend a call with ``backend=`` runs on; raises if it is unavailable."""
    check_backend("resolve_backend", backend)
    return _core.backend.resolve(backend)


def check_backend(function: str, backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"[{function}] backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def built_with_cuda() -> bool:
    return bool(_core.backend.built_with_cuda())
