"""A method's contract: the declared objects that join its server half (`strategies/`) and client half (`clients/`).

A method registers once (`strategies.registry.register`), naming its strategy class, its options,
its capabilities and the kind of client training it needs, a `TrainerKind` object. A client trainer
registers for a kind (`clients.registry.register_trainer`). Both import the kind from the core, so
neither half imports the other, and a misspelled kind is a NameError/ImportError when the module is
imported, not a failure on a client. A method whose clients train differently declares its kind in
its shared module beside its record names (e.g. `fedpeft.methods.fedkseed_wire.ZEROTH_ORDER`).

The registry of methods lives here, in the core, so the ClientApp and recipe validation (app) and the
trainers (methods) read one registration by name without importing a strategy module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from fedpeft.config import ConfigError
from fedpeft.faults.malformed import DENSE  # what most methods' replies carry (the `arrays` record)


@dataclass(frozen=True)
class TrainerKind:
    """How a method's clients train: one client trainer implements each kind."""

    name: str
    summary: str = ""

    def __str__(self) -> str:
        return self.name


FIRST_ORDER = TrainerKind("first_order", "gradient steps on the exchanged adapter tensors (optional DP-SGD)")
FEDPROX = TrainerKind("fedprox", "first-order steps with FedProx's proximal term")


class NoOptions(BaseModel):
    """A method without options of its own."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Capabilities:
    """What a method supports. Each `bool | str` field is True when supported, else the reason it is not."""

    sample_dp: bool | str = True
    """DP-SGD on every client (needs per-sample gradients of what the client trains)."""
    user_dp: bool | str = True
    """User-level DP: clipping and noise over each client's dense update."""
    codecs: tuple[str, ...] = ("up", "down")
    """Which `[codecs]` directions apply to its messages."""
    codecs_why: str = ""
    """Why a direction is missing, for the error message."""
    weighted_mean: bool | str = True
    """True when the aggregate is the (example-weighted) mean of the client tensors, before any server step; else
    what it is instead. User-level DP noise and `codecs.merge` rules assume a mean."""
    client_state: bool = False
    """Whether it keeps per-client state in the client state store between rounds."""
    secagg: bool | str = "it does not declare that its aggregate is a weighted mean of fixed-shape dense updates"
    """True when the aggregate is a plain weighted mean of fixed-shape dense updates, so a secure sum (`[secagg]`)
    can stand in for it; else why not. Off unless declared: a method must opt in."""
    uploads: str = DENSE
    """What a reply carries: DENSE adapter tensors (what tensor attacks and faults rewrite), or the name of the
    method's own upload form (malformed-reply kinds name the form they apply to)."""

    @property
    def tensor_uploads(self) -> bool | str:
        """True when replies carry adapter tensors, else why tensor attacks cannot apply."""
        return True if self.uploads == DENSE else f"its replies carry {self.uploads}, not adapter tensors"

    def refusal(self, capability: str) -> str | None:
        """Why `capability` is not supported, or None when it is."""
        value = getattr(self, capability)
        if value is True:
            return None
        return value if isinstance(value, str) and value else f"it does not support {capability}"


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: its server strategy, the client trainer kind, its options, its capabilities."""

    name: str
    strategy: type
    trainer: TrainerKind
    options: type[BaseModel]
    capabilities: Capabilities = field(default_factory=Capabilities)

    @property
    def summary(self) -> str:
        """The first line of the strategy's docstring."""
        return (self.strategy.__doc__ or "").strip().splitlines()[0] if self.strategy.__doc__ else ""


_METHODS: dict[str, MethodSpec] = {}  # filled as `strategies` imports its method modules


def add_method(spec: MethodSpec) -> None:
    """Record one method's registration; TypeError naming the method when its trainer is not a TrainerKind."""
    if not isinstance(spec.trainer, TrainerKind):
        raise TypeError(f"method '{spec.name}': trainer {spec.trainer!r} is not a declared TrainerKind (import one, "
                        f"e.g. fedpeft.methods.contract.FIRST_ORDER, or declare yours in the method's shared module)")
    if spec.name in _METHODS and _METHODS[spec.name].strategy is not spec.strategy:
        raise ValueError(f"method '{spec.name}' is already registered by {_METHODS[spec.name].strategy.__qualname__}")
    _METHODS[spec.name] = spec


def available_methods() -> list[str]:
    """Names of every registered method."""
    return sorted(_METHODS)


def method_spec(name: str) -> MethodSpec:
    """The registration of method `name`; ConfigError naming the known ones if there is none."""
    if name not in _METHODS:
        raise ConfigError(f"method.name '{name}' is not a registered method (known: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def method_options(name: str, options: dict[str, Any]) -> BaseModel:
    """Validate a method's options against its `Options` model."""
    model = method_spec(name).options
    try:
        return model.model_validate(options)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = "method." + ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(model.model_fields)) or "none"
                problems.append(f"unknown key '{key}' for method '{name}' (allowed: {allowed})")
            else:
                problems.append(f"{key}: {e['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None
