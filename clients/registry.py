"""Client trainers by the kind of training they implement: a method whose clients train differently adds one module here."""

from __future__ import annotations

from fedpeft.methods.contract import TrainerKind
from fedpeft.plugins import import_submodules

_TRAINERS: dict[TrainerKind, type] = {}
_discovered = False


def register_trainer(kind: TrainerKind):
    """Class decorator: register a client trainer (a `clients.base.Trainer`) as the implementation of `kind`."""
    if not isinstance(kind, TrainerKind):
        raise TypeError(f"register_trainer({kind!r}): name a declared TrainerKind (fedpeft.methods.contract), not a string")

    def deco(cls: type) -> type:
        if kind in _TRAINERS and _TRAINERS[kind] is not cls:
            raise ValueError(f"trainer kind '{kind}' is already implemented by {_TRAINERS[kind].__qualname__}")
        _TRAINERS[kind] = cls
        return cls

    return deco


def trainer_kinds() -> dict[TrainerKind, type]:
    """Every trainer kind with its implementation (after importing every trainer module)."""
    global _discovered
    if not _discovered:
        import clients

        import_submodules(clients, subpackages=False)  # trainers only: not the ClientApp above them
        _discovered = True
    return dict(_TRAINERS)


def get_trainer_class(kind: TrainerKind) -> type:
    """The trainer class implementing `kind`."""
    trainers = trainer_kinds()
    if kind not in trainers:
        raise KeyError(f"no client trainer implements '{kind}' (implemented: {', '.join(sorted(map(str, trainers)))})")
    return trainers[kind]
