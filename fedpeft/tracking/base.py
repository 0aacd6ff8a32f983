"""The interface every tracker implements: open the tool's run, log one round's metrics, close it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from fedpeft.config import Config

# How a run ended, in status.json's words.
Outcome = Literal["completed", "failed", "interrupted"]


class Tracker(ABC):
    """One tool's view of one fedpeft run. Each call may raise: the session turns that into a warning."""

    name: str = ""

    @abstractmethod
    def start(self, run_dir: Path, cfg: Config, resumed: bool, saved: dict[str, Any]) -> dict[str, Any]:
        """Open the tool's run (on resume, the one `saved` names) and return what a resume needs to find it."""

    @abstractmethod
    def log_round(self, server_round: int, metrics: dict[str, float]) -> None:
        """Record one round's metrics at step `server_round`."""

    @abstractmethod
    def finish(self, outcome: Outcome = "completed") -> None:
        """Close the tool's run, marked with how the fedpeft run ended, and stop whatever the tool started."""


def flat_config(cfg: Config) -> dict[str, str]:
    """The resolved config as `section.key` → value text (lists as JSON), the form tools take as parameters."""
    import json

    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node if isinstance(node, str) else json.dumps(node)

    walk("", cfg.model_dump(mode="json", exclude_none=True))
    return out
