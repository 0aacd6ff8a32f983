"""FedExP (Jhunjhunwala, Wang and Joshi, ICLR 2023): FedAvg with a server step size extrapolated from the updates.

Each round the server moves from x by η_g·Δ̄, where Δ̄ is the aggregate's update (the example-weighted
mean of the client updates Δ_i) and

    η_g = max(1, mean_i ‖Δ_i‖² / (2 (‖Δ̄‖² + ε))),

the step the paper derives from projection methods (POCS): when client updates disagree, their mean
is short and the server steps further. η_g = 1 is FedAvg. The step size of each round is in the
metrics row (`server_lr`). The paper also evaluates the average of the last two iterates; this
module reports the iterate itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from pydantic import Field

from fedpeft.codecs.endpoints import numpy_state, to_record
from fedpeft.methods.contract import FIRST_ORDER
from fedpeft.records import ARRAYS
from strategies.fedavg import FedAvgAdapter
from strategies.options import MethodOptions
from strategies.registry import Capabilities, register


class FedExPOptions(MethodOptions):
    """Recipe keys of `[method]` for fedexp."""

    eps: float = Field(1e-3, gt=0.0, description="ε in η_g = max(1, mean ‖Δ_i‖² / (2 (‖Δ̄‖² + ε)))")


@register("fedexp", trainer=FIRST_ORDER, options=FedExPOptions, capabilities=Capabilities(
    user_dp="its step size reads every client's own update norm, which user-level DP keeps from the server",
    codecs=("down",),
    codecs_why="its step size needs every client's dense update",
    secagg="its step size reads every client's own update norm, which secure aggregation hides",
))
class FedExP(FedAvgAdapter):
    """FedAvg's mean update, applied with FedExP's extrapolated server step size η_g ≥ 1."""

    def __init__(self, cfg, directory, model, workdir=None) -> None:
        super().__init__(cfg, directory, model, workdir)
        self.client_sq: list[float] = []
        self.step_size = 1.0

    def combine(self, server_round: int, valid: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's weighted mean, noting each client's squared update norm ‖Δ_i‖² for the step size."""
        self.client_sq = []
        for msg in valid:
            sent = numpy_state(self.reference(msg.metadata.src_node_id))
            mine = msg.content[ARRAYS]
            self.client_sq.append(sum(float(np.sum((mine[k].numpy().astype(np.float64) - v) ** 2))
                                      for k, v in sent.items()))
        return super().combine(server_round, valid)

    def server_step(self, server_round: int, aggregate: ArrayRecord) -> ArrayRecord:
        """x + η_g (aggregate − x), η_g from this round's update norms."""
        x = {k: v.astype(np.float64) for k, v in numpy_state(self.global_arrays).items()}
        agg = numpy_state(aggregate)
        mean_delta = {k: agg[k].astype(np.float64) - x[k] for k in x}
        mean_sq = sum(float(np.sum(d ** 2)) for d in mean_delta.values())
        self.step_size = max(1.0, float(np.mean(self.client_sq)) / (2.0 * (mean_sq + self.options.eps)))
        return to_record({k: x[k] + self.step_size * mean_delta[k] for k in x}, agg)

    def round_metrics(self, server_round: int, ledger) -> dict[str, Any]:
        """This round's server step size η_g."""
        return {"server_lr": self.step_size}
