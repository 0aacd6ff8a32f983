"""The trackers `output.trackers` may name: name → the module and class that implement it, and what it needs.

The registry names classes by module path, so checking a config's tracker names imports neither a
tracker nor its library; adding a tracker is one module plus one `register` line here.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrackerSpec:
    """A tracker: where its class is, the library it imports, and the pip extra that installs it."""

    name: str
    module: str  # the fedpeft module holding the class
    cls: str
    library: str  # the top-level module the tracker imports (checked before a run starts)
    extra: str  # the optional-dependency group: `pip install -e '.[<extra>]'`


TRACKERS: dict[str, TrackerSpec] = {}


def register(spec: TrackerSpec) -> None:
    """Add a tracker under its name (a second registration of the name is refused)."""
    if spec.name in TRACKERS:
        raise ValueError(f"tracker '{spec.name}' is registered twice")
    TRACKERS[spec.name] = spec


register(TrackerSpec("tensorboard", "fedpeft.tracking.tensorboard", "TensorBoardTracker", "tensorboard", "tensorboard"))
register(TrackerSpec("mlflow", "fedpeft.tracking.mlflow", "MlflowTracker", "mlflow", "mlflow"))
register(TrackerSpec("wandb", "fedpeft.tracking.wandb", "WandbTracker", "wandb", "wandb"))


def known() -> list[str]:
    """Every registered tracker name, sorted."""
    return sorted(TRACKERS)


def check_names(names: list[str]) -> list[str]:
    """`names` if each is a registered tracker, listed once; ValueError naming the problem otherwise."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker '{name}' (known: {', '.join(known())})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"tracker '{twice[0]}' is listed twice")
    return names


def missing(names: list[str]) -> list[str]:
    """One sentence per named tracker whose library is not installed (what to install)."""
    out = []
    for name in names:
        spec = TRACKERS[name]
        if importlib.util.find_spec(spec.library) is None:
            out.append(f"output.trackers has '{name}' but {spec.library} is not installed: "
                       f"pip install -c constraints.txt -e '.[{spec.extra}]' (in the fedpeft folder)")
    return out


def tracker_class(name: str) -> type[Any]:
    """The class of tracker `name` (its module is imported now; the library only when it starts)."""
    spec = TRACKERS[name]
    return getattr(importlib.import_module(spec.module), spec.cls)
