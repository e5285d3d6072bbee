"""Names that moved when the package was split into subpackages keep working.

- ``MovedModules``: a finder that gives, for an old module name (``halo.edge_root``), the very
  module it moved to (one module object, so patches and isinstance checks agree whichever name
  a script uses).
- ``moved_names``: a module ``__getattr__`` for names that moved to a sibling module when a long
  module was split; the sibling is imported on first use (it may import the module itself).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, moved: Mapping[str, str]) -> None:
        self.moved = moved

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in self.moved else None

    def create_module(self, spec):
        return importlib.import_module(self.moved[spec.name])

    def exec_module(self, module):
        pass


def moved_names(module: str, target: str, names: Iterable[str]) -> Callable[[str], Any]:
    names = frozenset(names)

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(target), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
