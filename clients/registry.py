"""Client trainers by name: a method whose clients train differently adds one module here."""

from __future__ import annotations

from fedpeft.plugins import import_submodules

_TRAINERS: dict[str, type] = {}
_discovered = False


def register_trainer(name: str):
    """Class decorator: register a client trainer (a `clients.base.Trainer`) under `name`."""

    def deco(cls: type) -> type:
        if name in _TRAINERS and _TRAINERS[name] is not cls:
            raise ValueError(f"trainer '{name}' is already registered by {_TRAINERS[name].__qualname__}")
        _TRAINERS[name] = cls
        return cls

    return deco


def get_trainer_class(name: str) -> type:
    """The trainer class registered under `name`."""
    global _discovered
    if not _discovered:
        import clients

        import_submodules(clients)
        _discovered = True
    if name not in _TRAINERS:
        raise KeyError(f"no client trainer named '{name}' (known: {', '.join(sorted(_TRAINERS))})")
    return _TRAINERS[name]
