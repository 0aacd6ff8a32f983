"""Discovery of plugin modules: importing every module of a package lets each one register itself."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def import_submodules(package: ModuleType, subpackages: bool = True) -> None:
    """Import every public module of `package` (the peft pattern: one module per method, no list to edit).

    `subpackages=False` leaves out its packages (e.g. `clients.app`, the layer above the trainers).
    """
    for mod in pkgutil.iter_modules(package.__path__):
        if not mod.name.startswith("_") and (subpackages or not mod.ispkg):
            importlib.import_module(f"{package.__name__}.{mod.name}")
