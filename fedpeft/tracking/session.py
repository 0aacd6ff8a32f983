"""A run's trackers: opened once round 0 is recorded (or on resume), fed each round's row, closed however the run ends.

A tracker that raises is warned about once (in run.log) and left out for the rest of the run: training
and the run directory go on untouched. `<run dir>/trackers.json` keeps, per tracker, what a resumed
run needs to continue the tool's own run (MLflow's run id, W&B's run id) and the last round it
logged, so after `--resume` every round reaches a tool once, rounds it missed included.
"""

from __future__ import annotations

import json
import logging
from types import TracebackType
from typing import Any, Self

from fedpeft.config import Config, ConfigError
from fedpeft.ledger import RunInterrupted
from fedpeft.rundir import RunDir
from fedpeft.tracking.base import Outcome, Tracker
from fedpeft.tracking.metrics import RoundMetrics
from fedpeft.tracking.registry import missing, tracker_class

STATE_FILE = "trackers.json"
logger = logging.getLogger("fedpeft.tracking")


def check_installed(names: list[str]) -> None:
    """ConfigError naming the extra to install for each tracker in `names` whose library is missing."""
    problems = missing(names)
    if problems:
        raise ConfigError("; ".join(problems))


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


class Tracking:
    """The trackers of one run (those of `output.trackers` still working)."""

    def __init__(self, rundir: RunDir, state: dict[str, dict[str, Any]]) -> None:
        self.rundir = rundir
        self.state = state
        self.active: dict[str, Tracker] = {}
        self.metrics = RoundMetrics(rundir.privacy_csv)

    @classmethod
    def open(cls, cfg: Config, rundir: RunDir, resumed: bool) -> Tracking:
        """Start every configured tracker and send it the rounds metrics.jsonl already has that it has not seen."""
        check_installed(cfg.output.trackers)
        session = cls(rundir, _read_state(rundir) if resumed else {})
        if not cfg.output.trackers:
            return session
        for name in cfg.output.trackers:
            saved = session.state.get(name, {})
            tracker: Tracker = tracker_class(name)()
            try:
                kept = tracker.start(rundir.path, cfg, resumed, dict(saved))
            except Exception as err:  # noqa: BLE001 (any error of a tool's library: the run goes on without it)
                session._disable(name, tracker, err, "could not start")
                continue
            session.state[name] = {**kept, "last_round": int(saved.get("last_round", -1))}
            session.active[name] = tracker
        try:
            for row in rundir.metrics():
                session._send(row)
            session._save()
        except BaseException:  # the caller never gets the session to close: close what started here
            session.close("failed")
            raise
        return session

    def log(self, row: dict[str, Any]) -> None:
        """Send one round's metrics row to every working tracker."""
        self._send(row)
        self._save()

    def close(self, outcome: Outcome = "completed") -> None:
        """Finish every working tracker's run, marked with how this run ended."""
        for name, tracker in list(self.active.items()):
            try:
                tracker.finish(outcome)
            except Exception as err:  # noqa: BLE001 (as above)
                logger.warning("output.trackers: %s failed while closing its run (%s)", name, _short(err))
                self.state[name]["error"] = _short(err)
        self.active.clear()
        self._save()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close("completed")
        elif issubclass(kind, (KeyboardInterrupt, RunInterrupted)):
            self.close("interrupted")
        else:
            self.close("failed")

    def _send(self, row: dict[str, Any]) -> None:
        if not self.active:
            return
        rnd = int(row["round"])
        metrics = self.metrics(row)  # every row, in order: the cumulative bytes count them all
        for name, tracker in list(self.active.items()):
            if rnd <= self.state[name]["last_round"]:
                continue  # logged before the run was resumed
            try:
                tracker.log_round(rnd, metrics)
            except Exception as err:  # noqa: BLE001 (as above)
                self._disable(name, tracker, err, f"failed at round {rnd}")
                continue
            self.state[name]["last_round"] = rnd

    def _disable(self, name: str, tracker: Tracker, err: Exception, what: str) -> None:
        logger.warning("output.trackers: %s %s (%s); it is off for the rest of this run (the run directory "
                       "has every round)", name, what, _short(err))
        self.active.pop(name, None)
        self.state.setdefault(name, {"last_round": -1})["error"] = _short(err)
        try:  # release what the tool started (a W&B service process, a writer thread)
            tracker.finish("failed")
        except Exception:  # it failed already: the warning above said so
            logger.debug("output.trackers: %s did not close cleanly", name, exc_info=True)

    def _save(self) -> None:
        if self.state:
            self.rundir.write_text(STATE_FILE, json.dumps(self.state, indent=2))


def _read_state(rundir: RunDir) -> dict[str, dict[str, Any]]:
    """trackers.json of a run directory ({} when there is none or it is unreadable)."""
    path = rundir.path / STATE_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in doc.items() if isinstance(v, dict)} if isinstance(doc, dict) else {}
