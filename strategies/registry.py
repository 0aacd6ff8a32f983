"""Federated methods by name: each method registers once, naming its strategy, trainer, options and capabilities.

The peft pattern (`register_peft_method`): one module per method registers itself when imported;
nothing else lists methods. Recipe validation, the ClientApp and the server read the registration
(`method_spec`), never a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from fedpeft.config import ConfigError


class NoOptions(BaseModel):
    """A method without options of its own."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Capabilities:
    """What a method supports. Each `bool | str` field is True when supported, else the reason it is not."""

    sample_dp: bool | str = True  # DP-SGD on every client (needs per-sample gradients of what the client trains)
    user_dp: bool | str = True  # Flower's clipping + noise wrappers over each client's dense update
    codecs: tuple[str, ...] = ("up", "down")  # which `[codecs]` directions apply to its messages
    codecs_why: str = ""  # why a direction is missing, for the error message
    # True when the aggregate is the (example-weighted) mean of the client tensors, before any server
    # step; else what it is instead. User-level DP noise and `codecs.merge` rules assume a mean.
    weighted_mean: bool | str = True
    client_state: bool = False  # keeps per-client state in the client state store between rounds
    tensor_uploads: bool | str = True  # replies carry adapter tensors (what tensor attacks and faults rewrite)

    def refusal(self, capability: str) -> str | None:
        """Why `capability` is not supported, or None when it is."""
        value = getattr(self, capability)
        if value is True:
            return None
        return value if isinstance(value, str) and value else f"it does not support {capability}"


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: its server strategy, the client trainer it names, its options, its capabilities."""

    name: str
    strategy: type
    trainer: str
    options: type[BaseModel]
    capabilities: Capabilities = field(default_factory=Capabilities)

    @property
    def summary(self) -> str:
        """The first line of the strategy's docstring."""
        return (self.strategy.__doc__ or "").strip().splitlines()[0] if self.strategy.__doc__ else ""


_METHODS: dict[str, MethodSpec] = {}  # filled as the package imports its method modules (strategies/__init__.py)


def register(name: str, *, trainer: str | None = None, options: type[BaseModel] | None = None,
             capabilities: Capabilities | None = None):
    """Class decorator: register a strategy class as method `name`.

    `trainer` names the client trainer (`clients.registry`); `options` is the pydantic model of the
    method's `[method]` keys; `capabilities` what it supports. Left out, each is inherited from the
    parent strategy class.
    """

    def deco(cls: type) -> type:
        if name in _METHODS and _METHODS[name].strategy is not cls:
            raise ValueError(f"method '{name}' is already registered by {_METHODS[name].strategy.__qualname__}")
        cls.method_name = name
        if trainer is not None:
            cls.client_trainer = trainer
        if options is not None:
            cls.Options = options
        if capabilities is not None:
            cls.capabilities = capabilities
        _METHODS[name] = MethodSpec(name, cls, cls.client_trainer, cls.Options, cls.capabilities)
        return cls

    return deco


def available_methods() -> list[str]:
    """Names of every registered method."""
    return sorted(_METHODS)


def method_spec(name: str) -> MethodSpec:
    """The registration of method `name`; ConfigError naming the known ones if there is none."""
    if name not in _METHODS:
        raise ConfigError(f"method.name '{name}' is not a registered method (known: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def get_strategy_class(name: str) -> type:
    """The strategy class registered under `name`."""
    return method_spec(name).strategy


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
