"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct client drift, over the adapter tensors.

The server keeps a control variate c (one tensor per exchanged adapter tensor) and sends it with
the global adapter; each client keeps its own c_i in the client state store, trains with the
gradient correction c − c_i, and uploads its adapter together with Δc_i.

- `scaffold`: as published. Plain local SGD (the paper's setting; other optimizers are refused) and
  option II, c_i⁺ = c_i − c + (x − y_i)/(K·η_l), from the K steps at local learning rate η_l.
- `scaffold-mean-grad`: c_i⁺ is the mean of the round's minibatch gradients before correction. Under
  plain SGD it equals option II; unlike option II it stays in gradient units with AdamW, where
  (x − y_i)/(K·η_l) is a normalized step and the correction swamps the gradients.
The server averages the adapters like FedAvg and moves
c ← c + (|S|/N)·mean(Δc_i). Both variates travel as real records, so the ledger charges them in
both directions, as a deployment sends them.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.codecs.endpoints import numpy_state, to_record
from fedpeft.config import Config, ConfigError
from fedpeft.methods.scaffold_wire import CONTROL, MEAN_GRADIENT, OPTION_II, SCAFFOLD
from strategies.fedavg import FedAvgAdapter
from strategies.options import ServerLrOptions
from strategies.registry import Capabilities, register



class ScaffoldOptions(ServerLrOptions):
    """Recipe keys of `[method]` for scaffold (server_lr: x ← x + η_g (mean(y_i) − x))."""


@register("scaffold", trainer=SCAFFOLD, options=ScaffoldOptions, capabilities=Capabilities(
    user_dp="its clients also upload their control-variate change, a second view of each update that "
            "Flower's DP wrappers neither clip nor noise",
    client_state=True,
    secagg="its clients upload two records (the adapter and the control-variate change); securing both in one sum "
           "is not wired yet",
))
class Scaffold(FedAvgAdapter):
    """FedAvg of the adapters plus server and client control variates (SCAFFOLD, option II, plain SGD)."""

    variate = OPTION_II  # how clients compute c_i⁺ (read by the client half)

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Option II reads (x − y_i)/(K·η_l) as a gradient: plain SGD only, as in the paper."""
        super().validate_config(cfg)
        t = cfg.train
        if t.optimizer != "sgd" or t.momentum != 0:
            raise ConfigError(f"method.name = 'scaffold' is SCAFFOLD as published: option II needs plain local SGD "
                              f"(train.optimizer = 'sgd', train.momentum = 0; got '{t.optimizer}', momentum "
                              f"{t.momentum:g}); for AdamW use method.name = 'scaffold-mean-grad'")

    def __init__(self, cfg, directory, model, workdir=None) -> None:
        super().__init__(cfg, directory, model, workdir)
        self.control = {k: np.zeros_like(v.numpy()) for k, v in self.initial_state.items()}

    def extra_records(self, server_round: int) -> dict[str, ArrayRecord | ConfigRecord]:
        """The server control variate c travels to every sampled client."""
        return {CONTROL: to_record(self.control, self.control)}

    def reply_templates(self) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
        """A reply carries the adapter and Δc_i, both shaped like the exchanged adapter tensors."""
        return {**super().reply_templates(), CONTROL: self.template}

    def combine(self, server_round: int, valid: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the adapters; c ← c + (|S|/N)·mean(Δc_i) over the accepted replies."""
        deltas = [m.content[CONTROL] for m in valid]
        for m in valid:  # Flower's FedAvg averages the one adapter record of each reply
            m.content = RecordDict({name: rec for name, rec in m.content.items() if name != CONTROL})
        arrays, metrics = super().combine(server_round, valid)
        share = len(valid) / self.cfg.sim.num_clients
        for key, c in self.control.items():
            mean = np.mean([d[key].numpy().astype(np.float64) for d in deltas], axis=0)
            self.control[key] = (c + share * mean).astype(c.dtype)
        return arrays, metrics

    def server_step(self, server_round: int, aggregate: ArrayRecord) -> ArrayRecord:
        """x ← x + η_g (mean(y_i) − x); with η_g = 1 the mean itself."""
        lr = self.options.server_lr
        if lr == 1.0 or self.global_arrays is None:
            return aggregate
        x, y = numpy_state(self.global_arrays), numpy_state(aggregate)
        return to_record({k: x[k] + lr * (y[k] - x[k]) for k in y}, y)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The server control variate."""
        return {f"control/{k}": v for k, v in self.control.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore the server control variate."""
        for key in self.control:
            self.control[key] = np.asarray(state[f"control/{key}"], dtype=self.control[key].dtype)


@register("scaffold-mean-grad", trainer=SCAFFOLD, options=ScaffoldOptions, capabilities=Scaffold.capabilities)
class ScaffoldMeanGrad(Scaffold):
    """SCAFFOLD whose client variate is the mean minibatch gradient: works with any local optimizer."""

    variate = MEAN_GRADIENT

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Any local optimizer."""
        FedAvgAdapter.validate_config(cfg)
