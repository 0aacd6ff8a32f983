"""Discovery of plugin modules: importing every module of a package lets each one register itself."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def import_submodules(package: ModuleType) -> None:
    """Import every public module of `package` (the peft pattern: one module per method, no list to edit)."""
    for mod in pkgutil.iter_modules(package.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{mod.name}")
