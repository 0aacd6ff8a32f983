"""fedpeft: federated parameter-efficient fine-tuning on Flower, peft, Ray and Opacus.

The Python API (`fedpeft.app.api`) is available from the package itself: `fedpeft.load_recipe`,
`fedpeft.simulate`, `fedpeft.resume`, `fedpeft.open_run`, `fedpeft.write_report`, `fedpeft.list_methods`. It is
imported on first use, so `import fedpeft.config` and the like stay light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MethodInfo", "Run", "list_methods", "load_recipe", "open_run", "resume", "simulate", "write_report"]


def __getattr__(name: str) -> Any:
    """The API's names, imported when first asked for."""
    if name in __all__:
        from fedpeft.app import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedpeft' has no attribute '{name}'")
