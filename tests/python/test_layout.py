"""The Python package's layout rules (issue 19): subpackages mirror the C++ areas, no module reaches
into another's private names, no module grows past about 500 lines without saying why, and the
module names of the flat layout still import."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import halo
import pytest

PACKAGE = Path(halo.__file__).parent
SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))
SHARED = {f"halo.{p.stem}" for p in PACKAGE.glob("_*.py") if p.stem != "__init__"} | {"halo._core"}
LONG = 520  # lines; a longer module states its reason in a "Long module:" line of its docstring


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(own: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = own.split(".") if is_package else own.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(text: str, own: str, is_package: bool = False) -> list[str]:
    """Private names module ``own`` takes from another halo module: imported by name, or read
    as an attribute of an imported halo module (``halo._core`` is the compiled module's
    namespace, and helper modules named ``_x`` are the package's own shared internals)."""
    tree = ast.parse(text)
    found, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = resolve(own, is_package, node)
            if not source.startswith("halo") or source == own:
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if private(alias.name) and full not in SHARED:
                    found.append(f"{own}: imports {full}")
                modules[alias.asname or alias.name] = full
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and private(node.attr):
            target = modules.get(node.value.id, "")
            if target.startswith("halo.") and "_core" not in target.split("."):
                found.append(f"{own}: reads {target}.{node.attr}")
    return found


def test_no_module_takes_another_modules_private_names():
    found = []
    for path in SOURCES:
        found += private_uses(path.read_text(), module_name(path), path.name == "__init__.py")
    assert found == []


def test_the_private_name_check_can_fail():
    text = (
        "from .cli import _fail\nfrom .. import ops\nops._no_kernel(1)\nfrom .._core import edge as _edge\n"
    )
    assert private_uses(text, "halo.edge.store_cli") == [
        "halo.edge.store_cli: imports halo.edge.cli._fail",
        "halo.edge.store_cli: reads halo.ops._no_kernel",
    ]


def test_long_modules_say_why():
    quiet = []
    for path in SOURCES:
        lines = path.read_text().count("\n")
        if lines > LONG:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if "Long module:" not in doc:
                quiet.append(f"{module_name(path)} ({lines} lines)")
    assert quiet == []


AREAS = ("quant", "lora", "hf", "gguf", "hwq", "edge", "sched", "optim", "io", "backends")


def test_areas_are_subpackages_mirroring_the_cpp_tree():
    for area in AREAS:
        assert (PACKAGE / area / "__init__.py").is_file(), area
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem.split("_")[0] in AREAS)
    assert flat == []


def test_flat_names_import_the_moved_modules():
    """In a fresh interpreter, each old name gives the very module it moved to."""
    script = (
        "import importlib, halo\n"
        "for old, new in sorted(halo.MOVED_MODULES.items()):\n"
        "    assert importlib.import_module(old) is importlib.import_module(new), (old, new)\n"
        "import halo.merge, halo.lora.merge_checkpoint as m, types\n"
        "assert not isinstance(halo.merge, types.ModuleType) and importlib.import_module('halo.merge') is m\n"
        "print(len(halo.MOVED_MODULES))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=300
    )
    assert int(out.stdout) == len(halo.MOVED_MODULES) >= 27
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("halo.edge_nothing")


def test_importing_halo_does_not_import_torch_or_the_edge_runtime():
    script = "import sys, halo\nprint(sorted(m for m in sys.modules if m in ('torch', 'halo.edge', 'transformers')))"
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
    assert importlib.import_module("halo").edge is importlib.import_module("halo.edge")
