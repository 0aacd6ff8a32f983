"""What became of a round's sampled clients, and the failure policy's decision about the run.

Every sampled client ends a round in exactly one way: its reply was accepted, rejected (with a
reason), refused as a message, lost in transit, or not back by the round timeout. The metrics
row counts each, marks the failures the fault plan injected, and says why a round failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedpeft.budget import describe_stop as describe_budget_stop

REASON = "failed_rounds"
EVENT = "stopped"  # as the budget's stop: the closing `event` line of metrics.jsonl


@dataclass(frozen=True)
class FailedRoundsStop:
    """The run stopped after `sim.max_failed_rounds` failed rounds."""

    after_round: int
    failed_rounds: int

    def record(self) -> dict[str, Any]:
        """The stop as summary.json and status.json record it under `stopped`."""
        return {"reason": REASON, "after_round": self.after_round, "failed_rounds": self.failed_rounds}

    def event(self) -> dict[str, Any]:
        """The stop as the closing line of metrics.jsonl."""
        return {"event": EVENT, **self.record()}


def describe_failed_rounds(record: dict[str, Any]) -> str:
    """A sentence about a run the failure policy stopped."""
    return (f"stopped after round {record.get('after_round')}: {record.get('failed_rounds')} rounds failed "
            "(sim.max_failed_rounds); the global model is the last successful round's")


def failures(server_round: int, lost: list[tuple[int, str]], injected) -> list[dict[str, Any]]:
    """Rejection entries for clients lost outside validation: (client, reason), marked when the plan injected it."""
    out = []
    for client, reason in lost:
        entry: dict[str, Any] = {"client_id": client, "reason": reason}
        kind = injected(server_round, client) if injected else None
        if kind:
            entry["injected"] = kind
        out.append(entry)
    return out


class FailurePolicy:
    """Counts failed rounds and decides when the run stops (`sim.max_failed_rounds`; 0 = never)."""

    def __init__(self, max_failed_rounds: int) -> None:
        self.limit = max_failed_rounds
        self.failed = 0

    def record(self, server_round: int, failed: bool) -> FailedRoundsStop | None:
        """Note one round's outcome; the stop once the limit is reached, else None."""
        self.failed += int(failed)
        if failed and self.limit and self.failed >= self.limit:
            return FailedRoundsStop(server_round, self.failed)
        return None


def describe_stop(record: dict[str, Any]) -> str:
    """A sentence about a run that stopped early, from its `stopped` record (budget or failure policy)."""
    return describe_failed_rounds(record) if record.get("reason") == REASON else describe_budget_stop(record)
