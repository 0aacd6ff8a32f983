"""TensorBoard: event files in `<run dir>/tensorboard/`, one scalar per metric tagged by group (eval/accuracy)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.tracking.base import Outcome, Tracker

if TYPE_CHECKING:
    from fedpeft.config import Config

LOG_DIR = "tensorboard"


class TensorBoardTracker(Tracker):
    """Scalars through torch's SummaryWriter (needs the `tensorboard` package)."""

    name = "tensorboard"

    def __init__(self) -> None:
        self.writer: Any = None

    def start(self, run_dir: Path, cfg: Config, resumed: bool, saved: dict[str, Any]) -> dict[str, Any]:
        """Open a writer on `<run dir>/tensorboard/`; on resume, rounds after the last one logged are written anew."""
        from torch.utils.tensorboard import SummaryWriter

        last = int(saved.get("last_round", -1))
        # purge_step hides events a killed run wrote after its last recorded round, so no step shows twice
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / LOG_DIR), purge_step=last + 1 if resumed else None)
        if not resumed:
            import tomli_w

            toml = tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True))
            self.writer.add_text("config", "```toml\n" + toml + "```", 0)
        return {}

    def log_round(self, server_round: int, metrics: dict[str, float]) -> None:
        """Add each metric as a scalar at step `server_round`, flushed so a running `tensorboard` sees it."""
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, server_round)
        self.writer.flush()

    def finish(self, outcome: Outcome = "completed") -> None:
        """Flush and close the event file (its writer thread stops)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
