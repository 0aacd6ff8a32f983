"""Weights & Biases: one W&B run per fedpeft run, config logged, metrics at step = round.

Offline unless the user chose otherwise (`output.wandb.mode`, `$WANDB_MODE`) or is logged in: an
offline run's files go under `<run dir>/wandb/`, and `wandb sync <run dir>/wandb` uploads them later
(a resumed run adds a second offline folder with the same run id; sync uploads both, in order).
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from fedpeft.tracking.base import Outcome, Tracker

if TYPE_CHECKING:
    from fedpeft.config import Config

DEFAULT_HOST = "https://api.wandb.ai"


def logged_in() -> bool:
    """Whether W&B has credentials: $WANDB_API_KEY, or a `wandb login` entry in the netrc file for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_HOST)).hostname or ""
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(configured: str) -> str | None:
    """The mode to give wandb.init: the configured one, None to let $WANDB_MODE decide, online if logged in, else offline."""
    if configured != "auto":
        return configured
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if logged_in() else "offline"


class WandbTracker(Tracker):
    """A W&B run with the resolved config, logged from whichever thread runs the server."""

    name = "wandb"

    def __init__(self) -> None:
        self.run: Any = None

    def start(self, run_dir: Path, cfg: Config, resumed: bool, saved: dict[str, Any]) -> dict[str, Any]:
        """Start (or, on resume, continue under the id `saved` keeps) the W&B run, its files under the run directory."""
        import wandb

        opts = cfg.output.wandb
        mode = resolve_mode(opts.mode)
        if mode != "online":
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # no crash reports sent from an offline run
        run_id = saved.get("id") if resumed else None  # a fresh run: W&B draws the id
        self.run = wandb.init(
            dir=str(Path(run_dir)), project=opts.project or cfg.name, entity=opts.entity or None,
            name=Path(run_dir).name, id=run_id, resume="allow" if run_id else None, mode=mode,
            config=cfg.model_dump(mode="json", exclude_none=True), reinit="create_new",
            # fedpeft's progress display owns the terminal and run.log takes stray output: W&B prints nothing
            settings=wandb.Settings(console="off", silent=True),
        )
        return {"id": self.run.id, "project": self.run.project}

    def log_round(self, server_round: int, metrics: dict[str, float]) -> None:
        """Log every metric at step `server_round`."""
        self.run.log(metrics, step=server_round)

    def finish(self, outcome: Outcome = "completed") -> None:
        """Finish the W&B run (exit code 0 only for a completed run) and stop W&B's service process."""
        import wandb

        try:
            if self.run is not None:
                self.run.finish(exit_code=0 if outcome == "completed" else 1)
        finally:
            self.run = None
            if wandb.run is None:  # no other W&B run of this process needs the service (wandb-core)
                wandb.teardown()
