"""SCAFFOLD clients: train with the correction c − c_i, keep c_i in the client state store, upload Δc_i.

The correction is added in `adjust_gradients` (after backward; with DP-SGD after clipping and
noise: it depends on no example). The new client variate follows the method's `variate`:
option II, c_i⁺ = c_i − c + (x − y_i)/(K·η_l) from the adapter's change over the K steps (`scaffold`,
plain SGD), or the mean of the round's minibatch gradients before correction, (1/K) Σ_k g_k
(`scaffold-mean-grad`). Under plain SGD the two agree, since y_i = x − η_l Σ_k (g_k + c − c_i).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from clients.first_order import FirstOrderTrainer
from clients.local_steps import LocalRound
from clients.registry import register_trainer
from fedpeft.methods.scaffold_wire import CONTROL, OPTION_II, SCAFFOLD, VARIATE_SET
from fedpeft.records import ARRAYS


@register_trainer(SCAFFOLD)
class ScaffoldTrainer(FirstOrderTrainer):
    """First-order training with SCAFFOLD's drift correction and the client control variate."""

    def begin(self, ctx: LocalRound) -> None:
        """Read c from the message and c_i from the store (zero at first participation)."""
        c = {k: v.numpy() for k, v in ctx.msg.content[CONTROL].items()}
        saved = self.store(ctx.msg).load_arrays(ctx.cid, VARIATE_SET)
        c_i = {k: saved[k] if k in saved else np.zeros_like(v) for k, v in c.items()}
        trained = {k: p for k, p in self.exchanged_parameters.items() if p.requires_grad}
        ctx.scratch.update(c=c, c_i=c_i, keys=list(trained))
        ctx.scratch["correction"] = [(p, torch.from_numpy(c[k] - c_i[k]).to(p.device, p.dtype))
                                     for k, p in trained.items()]
        ctx.scratch["grad_sum"] = [torch.zeros_like(p) for p in trained.values()]

    def adjust_gradients(self, ctx: LocalRound) -> None:
        """Add the step's gradient to the round's sum, then grad += c − c_i."""
        with torch.no_grad():
            for (p, corr), total in zip(ctx.scratch["correction"], ctx.scratch["grad_sum"]):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                total.add_(p.grad)
                p.grad.add_(corr)

    def upload(self, ctx: LocalRound, metrics: dict) -> RecordDict:
        """The adapter y_i and Δc_i = c_i⁺ − c_i; c_i⁺ is stored for the client's next round."""
        reply = super().upload(ctx, metrics)
        c_i = ctx.scratch["c_i"]
        new = dict(c_i)  # a client that took no step keeps its variate
        if ctx.steps and self.method.variate == OPTION_II:
            x = ctx.msg.content[ARRAYS]  # the global adapter this round started from
            step = ctx.steps * self.rt.cfg.train.lr
            for key in ctx.scratch["keys"]:
                y = self.exchanged_parameters[key].detach().cpu().numpy().astype(np.float64)
                value = c_i[key] - ctx.scratch["c"][key] + (x[key].numpy().astype(np.float64) - y) / step
                new[key] = value.astype(c_i[key].dtype)
        elif ctx.steps:
            for key, total in zip(ctx.scratch["keys"], ctx.scratch["grad_sum"]):
                new[key] = (total / ctx.steps).cpu().numpy().astype(c_i[key].dtype)
        self.store(ctx.msg).save_arrays(ctx.cid, VARIATE_SET, new)
        reply[CONTROL] = ArrayRecord({k: Array(np.ascontiguousarray(new[k] - c_i[k])) for k in sorted(new)})
        return reply
