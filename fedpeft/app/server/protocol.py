"""What the server round needs of a strategy, written down (`strategies.base.AdapterStrategy` provides it)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

if TYPE_CHECKING:
    from peft import PeftModel

    from fedpeft.ledger import CommLedger
    from fedpeft.rundir import RunDir


class RoundStrategy(Protocol):
    """The strategy interface of one server round: send, aggregate, report, checkpoint, export."""

    failure: str | None  # why the last round failed (sim.min_replies), or None
    example_limits: dict[int, int]  # client id -> its example count, where the server knows it
    upload_template: dict[str, tuple[tuple[int, ...], str]]  # what a reply uploads: key -> (shape, dtype)

    def summary(self) -> None:
        """Log the method, its options and any installed mechanism."""

    def initial_arrays(self) -> ArrayRecord:
        """The first global record."""

    def load_global(self, model: "PeftModel", arrays: ArrayRecord) -> None:
        """Put the global model into the server's model copy."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Any) -> Iterable[Message]:
        """This round's train messages."""

    def reference(self, node_id: int) -> ArrayRecord:
        """The dense tensors this round sent to `node_id`."""

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global (None: unchanged) and the aggregated train metrics."""

    def aggregate_secure(self, server_round: int, mean_update: dict[str, np.ndarray] | None, count: int,
                         failure: str | None) -> ArrayRecord | None:
        """The new global from a securely aggregated mean update of `count` clients (None: unchanged)."""

    def pop_rejections(self) -> list[Any]:
        """Rejected replies since the last call (each with `client_id` and `reason`)."""

    def pop_client_metrics(self) -> list[tuple[int, dict]]:
        """(client id, metrics) of the replies since the last call."""

    def report(self, server_round: int, ledger: "CommLedger") -> dict[str, Any]:
        """What the strategy adds to the round's metrics row."""

    def run_report(self, ledger: "CommLedger", rows: list[dict[str, Any]]) -> dict[str, Any]:
        """What the strategy adds to the run summary."""

    def server_state(self) -> dict[str, np.ndarray]:
        """Server state a resumed run restores."""

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore `server_state`."""

    def export(self, model: "PeftModel", rundir: "RunDir") -> None:
        """Write the final global model into the run directory."""
