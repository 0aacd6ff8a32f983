"""The communication budget (`sim.comm_budget_mib`): a run stops before the round that would exceed it.

Before round r is sent its messages are already built, so their bytes are exact (`message_bytes`,
as Flower serializes them). Replies are not known yet, so each of the round's messages is
predicted to bring back as much as the largest upload message of the run so far.

Before any training reply has been seen (round 1), a reply is predicted to be as large as the
message it answers with every array counted in full (`dense_message_bytes`): a client returns the
tensors it was sent, trained, and trained tensors no longer share objects the way a first download's
zero-initialized LoRA B matrices do (the plain download size undercounts a LoRA reply by up to half
its payload). The estimate is within a few hundred bytes for dense replies and an overestimate for
compressed ones (`codecs.up`), so a first round errs towards stopping rather than overspending.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.app import Message
from flwr.supercore import log

from fedpeft.ledger import MIB, CommLedger, dense_message_bytes, message_bytes

REASON = "comm_budget"
FIGURES = ("budget_mib", "spent_mib", "needed_mib")  # the record's figures, in MiB
OLD_FIGURES = ("budget_mb", "spent_mb", "needed_mb")  # their names in run directories written before the rename
EVENT = "stopped"  # the value of the `event` key of the metrics line that records the stop


@dataclass(frozen=True)
class BudgetStop:
    """Where a run stopped at its communication budget, in bytes."""

    before_round: int
    budget_bytes: float
    spent_bytes: int
    needed_bytes: int  # spent plus the predicted bytes of the round that was not sent

    def record(self) -> dict[str, Any]:
        """The stop as summary.json and status.json record it under `stopped` (MiB = 2^20 bytes)."""
        figures = (self.budget_bytes / MIB, self.spent_bytes / MIB, self.needed_bytes / MIB)
        return {"reason": REASON, "before_round": self.before_round, **dict(zip(FIGURES, figures))}

    def event(self) -> dict[str, Any]:
        """The stop as the closing line of metrics.jsonl (an `event` line, with no `round`)."""
        return {"event": EVENT, **self.record()}


def predicted_uploads(messages: int, largest_upload: int, dense_downloads: Sequence[int] = ()) -> int:
    """A round's predicted upload bytes: the largest upload so far per message, or (none yet) the dense downloads."""
    return largest_upload * messages if largest_upload > 0 else sum(dense_downloads)


def decide(server_round: int, budget_mib: float, spent: int, down: int, up: int) -> BudgetStop | None:
    """The stop before `server_round` if `spent` + its `down` + its predicted `up` bytes exceed the budget; or None."""
    if budget_mib <= 0:
        return None
    budget = budget_mib * MIB
    needed = spent + down + up
    return BudgetStop(server_round, budget, spent, needed) if needed > budget else None


def check_round(budget_mib: float, server_round: int, ledger: CommLedger,
                messages: Sequence[Message]) -> BudgetStop | None:
    """Measure a round's built messages against the ledger: the stop if sending them would exceed the budget."""
    if budget_mib <= 0:
        return None  # measuring serializes every message once more: only worth it with a budget
    spent = sum(ledger.totals().values())
    # Round 0 holds only node discovery (under `flwr run`), whose tiny replies say nothing about training replies.
    largest_up = ledger.largest_message("up", first_round=1)
    dense = [] if largest_up else [dense_message_bytes(m) for m in messages]
    up = predicted_uploads(len(messages), largest_up, dense)
    stop = decide(server_round, budget_mib, spent, sum(message_bytes(m) for m in messages), up)
    if stop is not None:
        log(INFO, "%s", describe_stop(stop.record()))
    return stop


def describe_stop(record: dict[str, Any]) -> str:
    """A sentence about a run the budget stopped, from its `stopped` record."""
    names = FIGURES if FIGURES[0] in record else OLD_FIGURES  # old run directories say MB for the same 2^20 B
    r, budget, spent, needed = (record.get(k) for k in ("before_round", *names))
    if record.get("reason") != REASON or not all(isinstance(v, (int, float)) for v in (r, budget, spent, needed)):
        return f"stopped early: {record}"
    over = f"about {needed:,.3f} MiB, over the budget of {budget:,.3f} MiB"
    if r == 1:
        return (f"stopped at the communication budget before round 1: round 1 would bring the total to {over}; only "
                f"the initial model (round 0) was evaluated and exported (raise sim.comm_budget_mib to train)")
    return (f"stopped at the communication budget before round {r}: {spent:,.3f} MiB sent in rounds 0–{r - 1}, "
            f"round {r} would bring the total to {over}")
