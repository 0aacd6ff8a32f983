"""The server half that personal-split methods (pFedPara, FedSA-LoRA) share: options, refusals, personal scores.

Their clients keep some adapter tensors (`exchanged(key)` is False) in the client state store and
train on a local train split (`clients.personal`). The server's global model lacks those personal
tensors, so the method's result is each client's personalized score on its own local test split:
the mean over the round's clients goes into the metrics row, the last round's into the summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from pydantic import Field

from fedpeft.config import Config
from fedpeft.methods.personal_wire import GLOBAL_LOCAL, LOCAL_TEST, PERSONAL
from fedpeft.nodes import NodeDirectory
from fedpeft.records import reply_metrics
from fedpeft.scores import PRIMARY_BY_KIND
from strategies.options import MethodOptions

if TYPE_CHECKING:
    from peft import PeftModel

    from fedpeft.ledger import CommLedger

__all__ = ["SAMPLE_DP_WHY", "SECAGG_WHY", "USER_DP_WHY", "LocalTestOptions", "PersonalScores"]

# The method's result is computed on raw local data and sent in every reply; DP-SGD's replies carry
# nothing computed from the data (clients.first_order.dp_reply_metrics), so it cannot be privatized.
SAMPLE_DP_WHY = ("its clients report their personalized score on a local test split of their own data, a figure "
                 "DP-SGD does not privatize")
SECAGG_WHY = ("its clients report their personalized score on their own local test split in every reply, outside "
              "any secure sum, and the method's result is those individual scores")
USER_DP_WHY = ("its clients keep personal adapter tensors the server never sees and report their personalized "
               "score on their own data, outside the clipped update")


class LocalTestOptions(MethodOptions):
    """`local_test_fraction`: the share of each client's data held out to score its personalized model."""

    local_test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of each client's data held out")


class PersonalScores:
    """Mixin before an `AdapterStrategy`: the round's mean personalized and global scores on the clients' local test splits."""

    def __init__(self, cfg: Config, directory: NodeDirectory, model: PeftModel, workdir: Path | None = None) -> None:
        super().__init__(cfg, directory, model, workdir)
        self.personal: dict[str, float] = {}
        self.metric = PRIMARY_BY_KIND[cfg.model.kind]

    def combine(self, server_round: int, valid: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The parent's aggregate; keep the clients' local-test scores for this round's metrics."""
        rows = [reply_metrics(m.content) for m in valid]
        rows = [r for r in rows if float(r.get(LOCAL_TEST, 0)) > 0]  # a one-example client has no local test split
        self.personal = {}
        if rows:
            self.personal = {
                f"personal_{self.metric}": float(np.mean([float(r[PERSONAL]) for r in rows])),
                f"global_{self.metric}_local": float(np.mean([float(r[GLOBAL_LOCAL]) for r in rows])),
                "personal_clients": len(rows),
            }
        return super().combine(server_round, valid)

    def round_metrics(self, server_round: int, ledger: CommLedger) -> dict[str, Any]:
        """Mean personalized and global score (accuracy or Rouge-L) of this round's clients, on their local test splits."""
        out, self.personal = self.personal, {}
        return {**super().round_metrics(server_round, ledger), **out}

    def run_metrics(self, ledger: CommLedger, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The last round's mean personalized and global local-test score, and the best personalized one."""
        m = self.metric
        out = super().run_metrics(ledger, rows)
        done = [r for r in rows if f"personal_{m}" in r]
        if not done:
            return out
        return {**out, f"final_personal_{m}": done[-1][f"personal_{m}"],
                f"final_global_{m}_local": done[-1][f"global_{m}_local"],
                f"best_personal_{m}": max(r[f"personal_{m}"] for r in done)}
