"""The .pyi stubs of halo._core list exactly what the compiled module exposes."""

from __future__ import annotations

import ast
from pathlib import Path

import halo
from halo import _core

STUBS = Path(halo.__file__).parent / "_core"


def stub_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def public(obj) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


def test_every_submodule_has_a_stub_file():
    submodules = {n for n in public(_core) if type(getattr(_core, n)).__name__ == "module"}
    stub_files = {p.stem for p in STUBS.glob("*.pyi") if p.stem != "__init__"}
    assert submodules == stub_files
    init = (STUBS / "__init__.pyi").read_text()
    for name in submodules:
        assert f"from . import {name} as {name}" in init


def test_stub_functions_match_module():
    for stub in STUBS.glob("*.pyi"):
        if stub.stem == "__init__":
            continue
        module = getattr(_core, stub.stem)
        assert stub_names(stub) == public(module), stub.name


def test_py_typed_is_shipped():
    assert (Path(halo.__file__).parent / "py.typed").exists()
