"""Registering a strategy as a federated method: the server half of the method's contract.

The peft pattern (`register_peft_method`): one module per method registers itself when imported;
nothing else lists methods. The registration (name, strategy, options, capabilities, and the
`TrainerKind` its clients need) is kept in the core (`fedpeft.methods.contract`), where recipe
validation, the ClientApp and the trainers read it by name without importing a strategy.
"""

from __future__ import annotations

from pydantic import BaseModel

from fedpeft.methods.contract import (
    Capabilities, MethodSpec, NoOptions, TrainerKind, add_method, available_methods, method_options, method_spec,
)

__all__ = ["Capabilities", "MethodSpec", "NoOptions", "available_methods", "get_strategy_class", "method_options",
           "method_spec", "register"]


def register(name: str, *, trainer: TrainerKind | None = None, options: type[BaseModel] | None = None,
             capabilities: Capabilities | None = None):
    """Class decorator: register a strategy class as method `name`.

    `trainer` is the kind of client training the method needs (a `TrainerKind`, declared in the
    core: a string fails here, naming the method); `options` is the pydantic model of the method's
    `[method]` keys; `capabilities` what it supports. Left out, each is inherited from the parent
    strategy class.
    """

    def deco(cls: type) -> type:
        cls.method_name = name
        if trainer is not None:
            cls.client_trainer = trainer
        if options is not None:
            cls.Options = options
        if capabilities is not None:
            cls.capabilities = capabilities
        add_method(MethodSpec(name, cls, cls.client_trainer, cls.Options, cls.capabilities))
        return cls

    return deco


def get_strategy_class(name: str) -> type:
    """The strategy class registered under `name`."""
    return method_spec(name).strategy
