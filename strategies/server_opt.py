"""Server optimizers over the adapter (Reddi et al., ICLR 2021; Hsu et al., 2019): FedAdam, FedYogi, FedAdagrad, FedAvgM.

The round's aggregate (the example-weighted mean of the client adapters, or the `codecs.merge`
rule over decoded uploads) defines the pseudo-gradient Δ = aggregate − x; the server optimizer
steps x with it. The update rules are those of Flower's `flwr.serverapp.strategy` FedAdam,
FedYogi, FedAdagrad and FedAvgM, except that Adam's bias correction counts the server's own steps
(t = 1 at the first step; Flower uses server_round + 1). Moments are strategy state
(`state_dict`), so a resumed run continues them. With user-level DP the step acts on the noised
mean: post-processing, ε unchanged.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord
from pydantic import BaseModel, ConfigDict, Field

from fedpeft.codecs.endpoints import numpy_state, to_record
from strategies.fedavg import FedAvgAdapter
from fedpeft.methods.contract import FIRST_ORDER
from strategies.options import ServerLrOptions
from strategies.registry import Capabilities, register


class FedOptOptions(BaseModel):
    """Recipe keys of `[method]` for fedadam, fedyogi and fedadagrad (Flower's FedOpt parameters)."""

    model_config = ConfigDict(extra="forbid")
    eta: float = Field(1e-2, gt=0.0, description="server learning rate η (per-coordinate step size of an adaptive step)")
    beta_1: float = Field(0.9, ge=0.0, lt=1.0, description="first-moment decay (fedadam, fedyogi)")
    beta_2: float = Field(0.99, ge=0.0, lt=1.0, description="second-moment decay (fedadam, fedyogi)")
    tau: float = Field(1e-3, gt=0.0, description="adaptivity τ (added to sqrt(v))")


class FedAvgMOptions(ServerLrOptions):
    """Recipe keys of `[method]` for fedavgm."""

    momentum: float = Field(0.5, ge=0.0, lt=1.0, description="server momentum β: v ← β v + (x − aggregate)")


class ServerOptimizer(FedAvgAdapter):
    """FedAvg's aggregate, then a server optimizer step from the global adapter this round started from."""

    moments: tuple[str, ...] = ()

    def __init__(self, cfg, directory, model, workdir=None) -> None:
        super().__init__(cfg, directory, model, workdir)
        self.state: dict[str, dict[str, np.ndarray]] = {}  # moment name -> key -> tensor
        self.steps = 0

    def server_step(self, server_round: int, aggregate: ArrayRecord) -> ArrayRecord:
        """x ← optimizer step with pseudo-gradient Δ = aggregate − x (x: what this round's clients were sent)."""
        x = {k: v.astype(np.float64) for k, v in numpy_state(self.global_arrays).items()}
        agg = numpy_state(aggregate)
        delta = {k: agg[k].astype(np.float64) - x[k] for k in x}
        for name in self.moments:
            self.state.setdefault(name, {k: np.zeros_like(v) for k, v in x.items()})
        self.steps += 1
        return to_record(self.step(x, delta), agg)

    def step(self, x: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global tensors (float64) from x and the pseudo-gradient delta."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """Optimizer moments and the step count."""
        out = {f"{name}/{k}": v for name, moment in self.state.items() for k, v in moment.items()}
        return {**out, "steps": np.asarray(self.steps)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore moments and step count."""
        self.steps = int(state["steps"])
        self.state = {}
        for full, value in state.items():
            if full != "steps":
                name, key = full.split("/", 1)
                self.state.setdefault(name, {})[key] = np.asarray(value, dtype=np.float64)


SERVER_OPT = Capabilities(secagg=True)  # the server step runs on the mean, which a secure sum gives


@register("fedadam", trainer=FIRST_ORDER, options=FedOptOptions, capabilities=SERVER_OPT)
class FedAdam(ServerOptimizer):
    """Adam on the server: m ← β1 m + (1−β1)Δ, v ← β2 v + (1−β2)Δ², x ← x + η_t m/(√v + τ)."""

    moments = ("m", "v")

    def step(self, x, delta):
        o, m, v = self.options, self.state["m"], self.state["v"]
        # Bias-corrected step size (Kingma & Ba, 2014, the line before section 2.1).
        eta_t = o.eta * np.sqrt(1 - o.beta_2 ** self.steps) / (1 - o.beta_1 ** self.steps)
        out = {}
        for k, d in delta.items():
            m[k] = o.beta_1 * m[k] + (1 - o.beta_1) * d
            v[k] = o.beta_2 * v[k] + (1 - o.beta_2) * d * d
            out[k] = x[k] + eta_t * m[k] / (np.sqrt(v[k]) + o.tau)
        return out


@register("fedyogi", trainer=FIRST_ORDER, options=FedOptOptions, capabilities=SERVER_OPT)
class FedYogi(ServerOptimizer):
    """Yogi on the server: v ← v − (1−β2)Δ² sign(v − Δ²), x ← x + η m/(√v + τ)."""

    moments = ("m", "v")

    def step(self, x, delta):
        o, m, v = self.options, self.state["m"], self.state["v"]
        out = {}
        for k, d in delta.items():
            m[k] = o.beta_1 * m[k] + (1 - o.beta_1) * d
            v[k] = v[k] - (1 - o.beta_2) * d * d * np.sign(v[k] - d * d)
            out[k] = x[k] + o.eta * m[k] / (np.sqrt(v[k]) + o.tau)
        return out


@register("fedadagrad", trainer=FIRST_ORDER, options=FedOptOptions, capabilities=SERVER_OPT)
class FedAdagrad(ServerOptimizer):
    """Adagrad on the server: v ← v + Δ², x ← x + η Δ/(√v + τ) (Flower's FedAdagrad: no first moment)."""

    moments = ("v",)

    def step(self, x, delta):
        o, v = self.options, self.state["v"]
        out = {}
        for k, d in delta.items():
            v[k] = v[k] + d * d
            out[k] = x[k] + o.eta * d / (np.sqrt(v[k]) + o.tau)
        return out


@register("fedavgm", trainer=FIRST_ORDER, options=FedAvgMOptions, capabilities=SERVER_OPT)
class FedAvgM(ServerOptimizer):
    """Server momentum: v ← β v + (x − aggregate) (v starts at the first pseudo-gradient), x ← x − lr·v."""

    moments = ("velocity",)

    def step(self, x, delta):
        o, vel = self.options, self.state["velocity"]
        out = {}
        for k, d in delta.items():
            # Flower's FedAvgM starts the momentum vector at the first pseudo-gradient.
            vel[k] = -d if self.steps == 1 else o.momentum * vel[k] - d
            out[k] = x[k] - o.server_lr * vel[k]
        return out
