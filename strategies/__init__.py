"""Server side of each federated method: one module per method, registered by name.

Importing the package imports every method module in it, so each registers itself and adding a
method edits nothing here.
"""

import sys

from fedpeft.plugins import import_submodules
from strategies.registry import (
    Capabilities, MethodSpec, available_methods, get_strategy_class, method_options, method_spec, register,
)

__all__ = ["Capabilities", "MethodSpec", "available_methods", "get_strategy_class", "method_options",
           "method_spec", "register"]

import_submodules(sys.modules[__name__])
