"""FedProx (Li et al., MLSys 2020): FedAvg whose clients add a proximal term μ/2‖w − w_global‖² to their loss.

The server side is FedAvg over the adapter; the term acts on the client (clients/fedprox.py), on
the exchanged adapter tensors only. μ = 0 is FedAvg.
"""

from __future__ import annotations

from pydantic import Field

from strategies.fedavg import FedAvgAdapter, FedAvgOptions
from fedpeft.methods.contract import FEDPROX
from strategies.registry import Capabilities, register


class FedProxOptions(FedAvgOptions):
    """Recipe keys of `[method]` for fedprox."""

    mu: float = Field(0.01, ge=0.0, description="weight μ of the proximal term μ/2 ||w - w_global||^2")


@register("fedprox", trainer=FEDPROX, options=FedProxOptions, capabilities=Capabilities(secagg=True))
class FedProx(FedAvgAdapter):
    """FedAvg over the adapter; clients train with a proximal term towards the global adapter."""
