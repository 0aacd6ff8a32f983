"""pFedPara (Hyeon-Woo et al., ICLR 2022): FedPara with one factor pair per layer kept on the client.

Per LoHa layer, W = (X1 Y1^T) o (X2 Y2^T): the first pair (peft's hada_w1_*) is global (sent,
averaged, sent back), the second (hada_w2_*) is personal and lives in the client state store;
the server never sees it. Each sampled client evaluates, on a local test split of its own data,
the global model (global pair with the initial personal pair) and its personalized model (after
local training); the server reports the mean of both per round.

With peft's LoHa initialization the personal pair starts at X2 Y2^T = 0, so the global model
alone carries no adapter update (only the shared classifier head): the adapter only acts
through each client's personal pair. The paper's variant W1 o (W2 + 1) would differ here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from pydantic import Field

from fedpeft.config import Config
from fedpeft.scores import PRIMARY_BY_KIND
from fedpeft.records import reply_metrics
from fedpeft.methods.pfedpara_wire import GLOBAL_LOCAL, LOCAL_TEST, PERSONAL, PFEDPARA, is_local
from strategies.fedpara import FedPara, FedParaOptions
from strategies.registry import Capabilities, register



class PFedParaOptions(FedParaOptions):
    """Recipe keys of `[method]` for pfedpara."""

    local_test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of each client's data held out")


@register("pfedpara", trainer=PFEDPARA, options=PFedParaOptions, capabilities=Capabilities(
    sample_dp="its DP-SGD path would train on the whole partition without the personal factor pair",
    user_dp="its clients train a personal factor pair the server never sees, besides the global adapter",
    client_state=True,
))
class PFedPara(FedPara):
    """FedAvg of the global LoHa factor pair; the personal pair stays in each client's state store."""

    @classmethod
    def matched_rank(cls, lora_rank: int) -> int:
        """Only one factor pair travels, so LoHa rank r sends what LoRA rank r sends."""
        return lora_rank

    @classmethod
    def exchanged(cls, key: str) -> bool:
        """Everything but the personal factor pair."""
        return not is_local(key)

    def __init__(self, cfg: Config, directory, model, workdir=None) -> None:
        super().__init__(cfg, directory, model, workdir)
        self.personal: dict[str, float] = {}
        self.metric = PRIMARY_BY_KIND[cfg.model.kind]

    def combine(self, server_round: int, valid: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the global pair; keep the clients' local-test accuracies for this round's metrics."""
        rows = [reply_metrics(m.content) for m in valid]
        rows = [r for r in rows if float(r.get(LOCAL_TEST, 0)) > 0]
        self.personal = {}
        if rows:
            self.personal = {
                f"personal_{self.metric}": float(np.mean([float(r[PERSONAL]) for r in rows])),
                f"global_{self.metric}_local": float(np.mean([float(r[GLOBAL_LOCAL]) for r in rows])),
                "personal_clients": len(rows),
            }
        return super().combine(server_round, valid)

    def round_metrics(self, server_round: int, ledger) -> dict[str, Any]:
        """Mean personalized and global score (accuracy or Rouge-L) of this round's clients, on their local test splits."""
        out, self.personal = self.personal, {}
        return out

    def run_metrics(self, ledger, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The last round's mean personalized and global local-test score."""
        m = self.metric
        done = [r for r in rows if f"personal_{m}" in r]
        if not done:
            return {}
        return {f"final_personal_{m}": done[-1][f"personal_{m}"],
                f"final_global_{m}_local": done[-1][f"global_{m}_local"],
                f"best_personal_{m}": max(r[f"personal_{m}"] for r in done)}
